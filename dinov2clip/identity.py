"""The three identities (DESIGN §2a), each a sha256 of what changes its embeddings, in one module:

- `towers`: DINOv2 and CLIP (ids with revisions, or content hashes), the preprocessing: what a precompute
  shard holds (every pooling);
- `encoders`: the towers and the DINOv2 pooling: what a projector is trained for;
- `model`: the encoders and the projector's weights: what an embedding space is.

Bundled files are not named here: their hashes are verified at load (docs/identity.md)."""
from __future__ import annotations

import hashlib
import json

from .preprocess import PreprocessConfig


def _towers(config) -> dict:
    """DINOv2 id + revision, CLIP name/pretrained (the name says QuickGELU), preprocessing version and every
    preprocessing setting that differs from that version's defaults (a config.json written with the defaults
    keeps the identity it always had)."""
    ident = {
        "dinov2": config.dinov2.get("origin") or config.dinov2["source"],
        "dinov2_revision": config.dinov2.get("revision"),
        "clip": config.clip.get("origin") or f"{config.clip['model_name']}/{config.clip.get('pretrained')}",
        "preprocess_version": config.preprocess.get("version"),
    }
    default = PreprocessConfig().to_dict()
    changed = {k: v for k, v in config.preprocess.items() if k != "version" and default.get(k) != v}
    return {**ident, "preprocess": changed} if changed else ident


def _encoders(config, pooling: str | None = None) -> dict:
    return {**_towers(config), "pooling": pooling or config.dinov2["pooling"]}


def _digest(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def towers(config) -> str:
    """Same towers ⇒ the same CLS and patch features, teacher and caption embeddings."""
    return _digest(_towers(config))


def encoders(config, pooling: str | None = None) -> str:
    """Same encoders ⇒ the same projector input and text embeddings, so one projector fits both. `pooling`:
    of these towers pooled another way."""
    return _digest(_encoders(config, pooling))


def model(config, projector_sha256: str | None) -> str:
    """Same model ⇒ comparable embeddings: the encoders and the projector's weights (`tensor_sha256`)."""
    return _digest({**_encoders(config), "projector": projector_sha256})


def known_model(config) -> str | None:
    """The model identity when the config alone tells it (a model directory records its projector's hash);
    None for a preset, whose projector is identified only once fetched."""
    sha = config.projector.get("tensor_sha256")
    return model(config, sha) if sha else None


def of_shard(meta: dict) -> str | None:
    """The towers identity a precomputed shard records; older shards: from their config."""
    enc = meta.get("encoders") or {}
    if enc.get("fingerprint"):
        return enc["fingerprint"]
    if enc.get("config"):
        from .config import ModelConfig

        return towers(ModelConfig.from_dict(enc["config"]))
    return None


def label(config) -> str:
    """The encoders in words (error messages)."""
    d, c = config.dinov2, config.clip
    return f"{d.get('origin') or d['source']} {d['pooling']} + {c.get('origin') or c['model_name']}"

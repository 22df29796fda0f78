"""Embed an evaluation set with a dinov2clip model and its CLIP teacher, through one code path.

Each image is decoded once (the core's `load_rgb`: EXIF orientation, RGB) and given to both image
towers, each with its own preprocessing: the core pipeline for DINOv2, open_clip's own transform for
the teacher. Captions are encoded once: the model's text tower *is* the teacher's.

What is cached is what a projector does not change: pooled DINOv2 features (the projector's input),
the teacher's image embeddings and the caption embeddings. Keys hold everything that changes those
numbers: model identities and weight-file hashes, the caption file's hash, split, image root, the
image files' sizes and mtimes, preprocessing, dtype, device type and `PIPELINE_VERSION`. Another
projector re-uses the features; anything else that changes gets new ones, never stale ones.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from dinov2clip import identity
from dinov2clip.embed import iter_pixel_batches, load_embeddings, save_embeddings
from dinov2clip.errors import UserError

from .datasets import RetrievalSet

PIPELINE_VERSION = 2  # bump when this module changes the numbers it produces (2: the teacher in fp32 on CPU)


def load_models(source: str, device: str | None = None, dtype="auto", batch_size: int = 32):
    """The model to evaluate with its CLIP teacher's image tower kept: one CLIP serves the teacher and the
    text side. (Features alone — Karpathy validation — need only `dinov2clip.load_encoders(teacher=True)`.)"""
    from dinov2clip import load

    return load(source, device=device, dtype=dtype, batch_size=batch_size, teacher=True)


def dinov2_identity(enc, pooling: str | None = None) -> dict:
    """What the DINOv2 features pooled by `pooling` (default: the encoders') depend on (an eval-cache key)."""
    d, pooling = enc.config.dinov2, pooling or enc.config.dinov2["pooling"]
    return {"origin": d.get("origin") or d["source"], "revision": d.get("revision"), "class": enc.image_encoder.kind,
            "pooling": pooling, "files": _bundled_hashes(enc.config, d),
            "encoder_fingerprint": identity.encoders(enc.config, pooling)}


def clip_identity(enc) -> dict:
    """What the teacher's image and caption embeddings depend on (an eval-cache key)."""
    c = enc.config.clip
    return {"origin": c.get("origin") or f"{c['model_name']}/{c.get('pretrained')}",
            "model_name": c["model_name"], "pretrained": c.get("pretrained"),
            "files": _bundled_hashes(enc.config, c)}


def _bundled_hashes(config, section: dict) -> dict:
    prefix = (section.get("path") or "").rstrip("/")
    return {k: v for k, v in sorted(config.weights_sha256.items()) if prefix and k.startswith(prefix + "/")}


class EmbeddingCache:
    """npz files named by the hash of their key; the key is stored inside and checked on read."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None

    @staticmethod
    def _normal(key: dict) -> dict:
        return json.loads(json.dumps(key, sort_keys=True, default=str))

    def _path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(self._normal(key), sort_keys=True).encode()).hexdigest()
        return self.root / f"{key['kind']}-{digest[:32]}.npz"

    def get(self, key: dict):
        """→ (embeddings, meta) or None."""
        if self.root is None or not self._path(key).is_file():
            return None
        try:
            emb, _, meta = load_embeddings(self._path(key))
        except UserError:  # unreadable or foreign file under our name: recompute and overwrite
            return None
        return (emb, meta) if meta.get("key") == self._normal(key) else None

    def put(self, key: dict, emb: np.ndarray, items: list[str], meta: dict) -> None:
        if self.root is not None:
            save_embeddings(self._path(key), emb, items, {"key": self._normal(key), **meta})


@dataclass
class Embedded:
    """One evaluation set, embedded. Rows follow `dataset` (failed images already dropped)."""
    dataset: RetrievalSet
    dinov2: np.ndarray  # pooled DINOv2 features, the projector's input
    teacher: np.ndarray  # CLIP image embeddings, L2-normalised
    text: np.ndarray  # caption embeddings, L2-normalised
    cache: dict  # part → "hit" / "miss" / "off"


def embed_set(models, ds: RetrievalSet, cache: EmbeddingCache, skip_unreadable: bool = False,
              workers: int | None = None, progress: bool = True, pooling: str | None = None) -> Embedded:
    """`models`: `dinov2clip.Encoders` (or a model) with the teacher; `pooling` (default: theirs) pools the
    DINOv2 features."""
    model = models
    common = {"dtype": str(model.dtype).removeprefix("torch."), "device": model.device.type,
              "pipeline": PIPELINE_VERSION}
    images = {**common, "annotation_sha256": ds.annotation_sha256, "split": ds.split,
              "image_root": str(ds.image_root.resolve()), "images": ds.images_digest()}
    keys = {
        "dinov2": {**images, "kind": "dinov2", "encoder": dinov2_identity(models, pooling),
                   "preprocess": model.config.preprocess},
        "teacher": {**images, "kind": "clip-image", "encoder": clip_identity(models),
                    "preprocess": models.teacher_preprocess,
                    "teacher_dtype": str(models.teacher_dtype).removeprefix("torch.")},
        "text": {**common, "kind": "clip-text", "encoder": clip_identity(models),
                 "captions": hashlib.sha256("\n".join(ds.captions).encode()).hexdigest()},
    }
    found = {part: cache.get(key) for part, key in keys.items()}
    status = {part: "off" if cache.root is None else ("hit" if found[part] else "miss") for part in keys}
    arrays = {part: hit[0] for part, hit in found.items() if hit}
    failed = {int(i): msg for hit in found.values() if hit for i, msg in hit[1].get("failed", {}).items()}

    towers = {"dinov2": (model.preprocess, partial(model.encode_dinov2, pooling=pooling)),
              "teacher": (model.teacher_transform, model.encode_teacher)}  # part → (image transform, batch encoder)
    towers = {part: tower for part, tower in towers.items() if part not in arrays}
    if towers:
        new, new_failed = _image_pass(ds, towers, model.batch_size, skip_unreadable, workers, progress)
        for part, emb in new.items():
            cache.put(keys[part], emb, [str(p) for p in ds.images], {"failed": new_failed})
        arrays.update(new)
        failed.update(new_failed)
    if failed and not skip_unreadable:
        i = min(failed)
        raise UserError(f"{ds.annotation_file}: {ds.entries[i]}: {failed[i]}; pass --skip-missing to skip it")
    if "text" not in arrays:
        arrays["text"] = model.encode_text(ds.captions, progress=progress).numpy()
        cache.put(keys["text"], arrays["text"], ds.captions, {})

    kept = [i for i in range(len(ds.images)) if i not in failed]
    reduced = ds.without({i: f"unreadable: {msg}" for i, msg in failed.items()})
    caption_kept = [j for j, i in enumerate(ds.text_image_ids) if i not in failed]
    if not reduced.images or not reduced.captions:
        raise UserError(f"{ds.annotation_file}: no readable image with a caption is left to evaluate")
    return Embedded(reduced, arrays["dinov2"][kept], arrays["teacher"][kept], arrays["text"][caption_kept], status)


def _image_pass(ds: RetrievalSet, towers: dict, batch_size: int, skip: bool, workers: int | None, progress: bool):
    """Decode each image once (the core's image loop), run every tower on it. A bad image fails alone, never
    its batch; without `skip` the first one stops the run at once."""
    from tqdm.auto import tqdm

    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    out = {part: [None] * len(ds.images) for part in towers}
    failed: dict[int, str] = {}
    transforms = {part: transform for part, (transform, _) in towers.items()}
    with tqdm(total=len(ds.images), desc=f"embed {ds.name} images", unit="img", disable=not progress) as bar:
        for idx, pixels, failures in iter_pixel_batches(transforms, ds.images, batch_size, max(1, workers)):
            for i, err in failures:
                if not skip:
                    raise UserError(f"{ds.annotation_file}: {ds.entries[i]}: {err}; pass --skip-missing to skip it")
                failed[i] = err
            for part, (_, encode) in towers.items() if pixels is not None else ():
                for i, row in zip(idx, encode(pixels[part]).float().cpu().numpy()):
                    out[part][i] = row
            bar.update(len(idx) + len(failures))
    arrays = {}
    for part, rows in out.items():
        dim = next((r.shape[0] for r in rows if r is not None), 0)
        arrays[part] = np.stack([r if r is not None else np.zeros(dim, np.float32) for r in rows]).astype(np.float32)
    return arrays, failed

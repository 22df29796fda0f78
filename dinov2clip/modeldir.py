"""Writing model directories: save, convert the reference checkpoint, bundle, make a tiny one."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from . import identity
from .atomic import AtomicDir, write_json_atomic
from .clip_text import (CLIP_CONFIG_FILE, CLIP_WEIGHTS_FILE, check_quickgelu, resolve_teacher, save_clip,
                        text_tensor_sha256)
from .config import (CONFIG_FILE, FORMAT_VERSION, PROJECTOR_FILE, ModelConfig, check_relative, file_sha256, read_config,
                     tensor_sha256)
from .dinov2 import check_pooling, pooled_dim, resolve_dinov2_source
from .errors import UserError, first_line
from .projector import ProjectorWithResiduals, load_projector

TINY_LICENSE = "Apache-2.0 (random weights, for tests and demos only)"


MODEL_DIR_ENTRIES = {CONFIG_FILE, PROJECTOR_FILE, "dinov2", "clip", "README.md"}


def is_model_dir(path: Path) -> bool:
    """A directory dinov2clip wrote: a readable config.json and nothing but a model directory's parts."""
    try:
        read_config(path)
    except UserError:
        return False
    return all(p.name in MODEL_DIR_ENTRIES or p.name.startswith("LICENSE") for p in path.iterdir())


def write_projector(projector: ProjectorWithResiduals, path: Path) -> str:
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous().cpu() for k, v in projector.state_dict().items()}
    # One metadata key only: safetensors writes metadata in hash-map order, so more keys would make
    # identical projectors differ byte for byte. Dims are read back from the tensor shapes.
    save_file(state, str(path), metadata={"format": "pt"})
    return tensor_sha256(state)


def finish_config(config: ModelConfig, root: Path) -> None:
    """Record the sha256 of every weight file and of every other file of the bundled towers (their config
    files change embeddings too: layer_norm_eps, quick_gelu), all verified at load, and a bundled CLIP's
    text-tensor hash (which lets a query-only process read and check the text tower alone); write config.json."""
    towers = {config.dinov2.get("path"), config.clip.get("path")} - {None}
    files = sorted(p for p in root.rglob("*") if p.is_file() and (
        p.suffix in (".safetensors", ".bin", ".pt") or p.relative_to(root).parts[0] in towers))
    config.weights_sha256 = {p.relative_to(root).as_posix(): file_sha256(p) for p in files}
    clip = {k: v for k, v in config.clip.items() if k != "text_sha256"}
    if clip.get("path") and (root / clip["path"] / CLIP_WEIGHTS_FILE).is_file():
        digest = text_tensor_sha256(root / clip["path"])
        clip.update({"text_sha256": digest} if digest else {})
    config.clip = clip
    config.format_version = FORMAT_VERSION  # what this writer wrote, whatever the source's was
    write_json_atomic(root / CONFIG_FILE, config.to_dict())


def save_model_dir(config: ModelConfig, projector: ProjectorWithResiduals, out_dir: Path,
                   overwrite: bool = False, extra=None, parts: Path | None = None) -> Path:
    """A model directory that references its DINOv2/CLIP sources and ships its own projector. The towers the
    config bundles (its `path`s) are copied from `parts`; `extra(tmp_dir, config)` may add others, before
    hashes are recorded."""
    config = replace(config)
    with AtomicDir(out_dir, overwrite, is_ours=is_model_dir, what="model directory") as tmp:
        digest = write_projector(projector, tmp / PROJECTOR_FILE)
        config.projector = {**{k: v for k, v in config.projector.items() if k != "source"},
                            **projector.config.to_dict(), "path": PROJECTOR_FILE, "tensor_sha256": digest}
        for rel in (s["path"] for s in (config.dinov2, config.clip) if s.get("path") and parts is not None):
            shutil.copytree(parts / check_relative(rel, f"model source {parts}"), tmp / rel)
        if extra is not None:
            extra(tmp, config)
        config.projector["encoder_fingerprint"] = identity.encoders(config)  # the encoders it is trained for
        finish_config(config, tmp)
    return Path(out_dir)


def convert_reference(checkpoint: str, out_dir: str, dinov2: str, pooling: str, clip: str,
                      pretrained: str | None, license: str = "unknown", overwrite: bool = False) -> Path:
    """Reference `.pt` checkpoint → model directory, after checking its dims against the named parts."""
    from transformers import AutoConfig
    import open_clip

    check_pooling(pooling)
    clip_name, clip_pretrained = resolve_teacher(clip, pretrained)
    check_quickgelu(clip_name, clip_pretrained)
    projector = load_projector(checkpoint)
    dinov2 = resolve_dinov2_source(dinov2)
    try:
        hidden = AutoConfig.from_pretrained(dinov2, trust_remote_code=False).hidden_size
    except OSError as e:
        raise UserError(f"cannot read the DINOv2 config of {dinov2!r} to check dims: "
                        f"{first_line(e)}") from None
    clip_cfg = open_clip.get_model_config(clip_name)
    if clip_cfg is None:
        raise UserError(f"unknown open_clip model {clip_name!r}")
    want_in, want_out = pooled_dim(hidden, pooling), clip_cfg["embed_dim"]
    got = projector.config
    if (got.input_dim, got.output_dim) != (want_in, want_out):
        raise UserError(f"checkpoint maps {got.input_dim}→{got.output_dim}, but {dinov2} with {pooling} "
                        f"pooling gives {want_in}-d and {clip_name} embeds in {want_out}-d")
    config = ModelConfig(
        dinov2={"source": dinov2, "pooling": pooling, "hidden_size": hidden},
        clip={"model_name": clip_name, "pretrained": clip_pretrained, "embed_dim": want_out,
              "quick_gelu": bool(clip_cfg.get("quick_gelu", False))},
        projector={}, license=license,
        provenance={"converted_from": Path(checkpoint).name, "checkpoint_sha256": file_sha256(Path(checkpoint))},
    )
    return save_model_dir(config, projector, Path(out_dir), overwrite)


def bundle(source: str, out_dir: str, overwrite: bool = False) -> Path:
    """Any source → a self-contained directory (DINOv2, CLIP and projector inside) that loads offline."""
    from .factory import build, resolve_source

    config, root = resolve_source(source)
    model = build(config, root, device="cpu", teacher=True)
    clip_cfg = _open_clip_cfg(config, root)

    def add_parts(tmp: Path, cfg: ModelConfig) -> None:
        model.image_encoder.backbone.save_pretrained(tmp / "dinov2", safe_serialization=True)
        save_clip(model.teacher, clip_cfg, tmp / "clip")
        d, c = cfg.dinov2, cfg.clip
        cfg.dinov2 = {**d, "origin": d.get("origin") or _id(d["source"], d.get("revision")), "path": "dinov2"}
        cfg.clip = {**c, "origin": c.get("origin") or f"{c['model_name']}/{c.get('pretrained')}", "path": "clip"}

    found = replace(model.encoders.found_config(), projector=config.projector)
    return save_model_dir(found, model.projector, Path(out_dir), overwrite, extra=add_parts)


def _id(source: str, revision: str | None) -> str:
    return f"{source}@{revision}" if revision else source


def _open_clip_cfg(config: ModelConfig, root: Path | None) -> dict:
    import open_clip

    if config.clip.get("path"):
        return json.loads((root / config.clip["path"] / CLIP_CONFIG_FILE).read_text())["model_cfg"]
    cfg = open_clip.get_model_config(config.clip["model_name"])
    if cfg is None:
        raise UserError(f"cannot bundle {config.clip['model_name']!r}: no open_clip config to record")
    return cfg


TINY_CLIP_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# Random-weight architectures: "tiny" for tests and demos, "reference" (dinov2-base, ViT-B-16-quickgelu,
# 768→2048×6→512) for speed measurements, where weight values do not matter.
RANDOM_SIZES = {
    "tiny": {"dinov2": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2},
             "clip": "tiny-quickgelu", "projector": (64, 2)},
    "reference": {"dinov2": {}, "clip": "ViT-B-16-quickgelu", "projector": (2048, 6)},
}


def make_tiny(out_dir: str, seed: int = 0, pooling: str = "mean", overwrite: bool = False,
              size: str = "tiny") -> Path:
    """A random model directory (bundled DINOv2 + CLIP + projector) that loads offline: tests, demos,
    and (size="reference") benchmarks on real-size architectures."""
    import open_clip
    from open_clip.model import CLIP
    from transformers import Dinov2Config, Dinov2Model

    if size not in RANDOM_SIZES:
        raise UserError(f"unknown size {size!r}: choose one of {', '.join(RANDOM_SIZES)}")
    spec = RANDOM_SIZES[size]
    clip_cfg = TINY_CLIP_CFG if size == "tiny" else open_clip.get_model_config(spec["clip"])
    torch.manual_seed(seed)
    dinov2_cfg = Dinov2Config(image_size=224, patch_size=14, **spec["dinov2"])
    backbone = Dinov2Model(dinov2_cfg).eval()
    clip_model = CLIP(**clip_cfg).eval()
    hidden, blocks = spec["projector"]
    projector = ProjectorWithResiduals(pooled_dim(dinov2_cfg.hidden_size, pooling), clip_cfg["embed_dim"],
                                       hidden, blocks).eval()
    config = ModelConfig(
        dinov2={"source": "dinov2", "pooling": pooling, "class": "Dinov2Model", "hidden_size": dinov2_cfg.hidden_size,
                "origin": f"sha256:{tensor_sha256(backbone.state_dict())}"},
        clip={"model_name": spec["clip"], "pretrained": None, "embed_dim": clip_cfg["embed_dim"],
              "quick_gelu": True, "origin": f"sha256:{tensor_sha256(clip_model.state_dict())}"},
        projector={}, license=TINY_LICENSE,
        provenance={"recipe": f"random {size} model (dinov2clip make-tiny)", "seed": seed,
                    "demo": "random-weight DINOv2 and CLIP towers"},
    )

    def add_parts(tmp: Path, cfg: ModelConfig) -> None:
        backbone.save_pretrained(tmp / "dinov2", safe_serialization=True)
        save_clip(clip_model, clip_cfg, tmp / "clip")
        cfg.dinov2 = {**cfg.dinov2, "path": "dinov2"}
        cfg.clip = {**cfg.clip, "path": "clip"}

    return save_model_dir(config, projector, Path(out_dir), overwrite, extra=add_parts)

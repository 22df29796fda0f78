"""`config.json` of a model directory (DESIGN §3): what to build, where weights come from, provenance."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import torch

from .errors import UserError
from .preprocess import PreprocessConfig

# 1.1: clip.text_sha256 (optional; 1.0 readers ignore it). 1.2: weights_sha256 also lists the bundled towers'
# config files (1.x readers verify every file listed there; a 1.1 directory just has fewer hashes).
FORMAT_VERSION = "1.2"
CONFIG_FILE = "config.json"
PROJECTOR_FILE = "projector.safetensors"


@dataclass
class ModelConfig:
    # dinov2: source (hub id or bundled relative dir), revision, pooling, class, hidden_size, origin
    dinov2: dict
    # clip: model_name, pretrained (tag, or bundled relative dir), embed_dim, quick_gelu, origin
    clip: dict
    # projector: input_dim, output_dim, hidden_dim, num_blocks, source, tensor_sha256
    projector: dict
    preprocess: dict = field(default_factory=lambda: PreprocessConfig().to_dict())
    license: str = "unknown"
    provenance: dict = field(default_factory=dict)
    # relative file path → sha256: every weight file, and every file of the bundled dinov2/ and clip/
    weights_sha256: dict = field(default_factory=dict)
    format_version: str = FORMAT_VERSION

    @property
    def embed_dim(self) -> int | None:
        """None until the projector is known (a preset before its weights are fetched)."""
        dim = self.projector.get("output_dim")
        return None if dim is None else int(dim)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["embed_dim"] = self.embed_dim
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "ModelConfig":
        version = str(d.get("format_version", ""))
        major = version.split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            raise UserError(f"{where}: format_version {version or '(missing)'} is not supported by this "
                            f"dinov2clip (reads {FORMAT_VERSION.split('.')[0]}.x); upgrade dinov2clip")
        missing = [k for k in ("dinov2", "clip", "projector") if k not in d]
        if missing:
            raise UserError(f"{where}: missing section(s) {', '.join(missing)}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def read_config(model_dir: Path) -> ModelConfig:
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"not a dinov2clip model directory (no {CONFIG_FILE}): {model_dir}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    return ModelConfig.from_dict(raw, where=str(path))


def check_relative(rel: str, where: str) -> str:
    """Model directories may only point inside themselves."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise UserError(f"{where}: path {rel!r} must be relative and inside the model directory")
    return rel


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of the fp32 values by sorted key: independent of file format and container."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu", torch.float32).contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()

"""The residual-MLP projector that maps a pooled DINOv2 embedding into CLIP space.

Architecture (DESIGN §2), chosen to load the published reference checkpoint unchanged:
Linear(in→hidden); num_blocks × [x + (Linear→LayerNorm→GELU→Linear→LayerNorm)(x)];
LayerNorm(hidden); Linear(hidden→hidden/2)→GELU→Linear(hidden/2→out); LayerNorm(out).
"""
from __future__ import annotations

import io
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UserError, first_line


@dataclass(frozen=True)
class ProjectorConfig:
    input_dim: int = 768
    output_dim: int = 512
    hidden_dim: int = 2048
    num_blocks: int = 6

    def to_dict(self) -> dict:
        return asdict(self)


class ResidualBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # Indices 0,1,3,4 carry weights: the reference checkpoint's key layout.
        self.layers = nn.Sequential(
            nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class ProjectorWithResiduals(nn.Module):
    """`forward` returns the raw, un-normalised output; callers L2-normalise at their boundary."""

    def __init__(self, input_dim: int = 768, output_dim: int = 512, hidden_dim: int = 2048, num_blocks: int = 6):
        super().__init__()
        if hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even, got {hidden_dim}")
        self.config = ProjectorConfig(input_dim, output_dim, hidden_dim, num_blocks)
        # The unit's identity, set by the factory that loads it: its weights' `tensor_sha256` and the encoder
        # fingerprint it was trained for (None: not recorded).
        self.sha256 = self.trained_for = None
        self.input_proj = nn.Linear(input_dim, hidden_dim)
        self.residual_blocks = nn.ModuleList(ResidualBlock(hidden_dim) for _ in range(num_blocks))
        self.hidden_norm = nn.LayerNorm(hidden_dim)
        self.output_proj = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim // 2), nn.GELU(), nn.Linear(hidden_dim // 2, output_dim)
        )
        self.layer_norm = nn.LayerNorm(output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)
        for block in self.residual_blocks:
            x = block(x)
        return self.layer_norm(self.output_proj(self.hidden_norm(x)))


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "projector")
_PREFIXES = ("module.", "_orig_mod.", "projector.", "model.")


def normalize_state_dict(obj) -> dict[str, torch.Tensor]:
    """Unwrap checkpoint containers and strip DDP/compile prefixes; cast to fp32."""
    while isinstance(obj, dict) and "input_proj.weight" not in obj:
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            stripped = _strip_prefixes(obj)
            if "input_proj.weight" in stripped:
                obj = stripped
                break
            raise UserError("checkpoint holds no projector weights (no 'input_proj.weight' key, "
                            f"top-level keys: {sorted(obj)[:8]})")
        obj = inner
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint is a {type(obj).__name__}, not a state dict")
    return {k: v.float() for k, v in _strip_prefixes(obj).items() if torch.is_tensor(v)}


def _strip_prefixes(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def infer_config(sd: dict[str, torch.Tensor]) -> ProjectorConfig:
    """Read the dimensions off a state dict so any trained size loads without being told."""
    try:
        hidden_dim, input_dim = sd["input_proj.weight"].shape
        output_dim = sd["output_proj.2.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"projector state dict lacks {e.args[0]!r}") from None
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"residual_blocks\.(\d+)\.", k))}
    return ProjectorConfig(int(input_dim), int(output_dim), int(hidden_dim), len(blocks))


def projector_from_state_dict(sd: dict[str, torch.Tensor]) -> ProjectorWithResiduals:
    sd = normalize_state_dict(sd)
    projector = ProjectorWithResiduals(**infer_config(sd).to_dict())
    missing, unexpected = projector.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"projector weights do not match the architecture: missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}")
    return projector.eval()


def load_projector(path: str | Path, data: bytes | None = None) -> ProjectorWithResiduals:
    """Load a projector from a reference `.pt` checkpoint, a `projector.safetensors` or a model directory.
    The file is read into memory (or `data`, its bytes already read and checked, is used): a memory-mapped
    file overwritten later would change the loaded weights."""
    path = Path(path)
    if path.is_dir():
        path = path / "projector.safetensors"
    if data is None:
        if not path.is_file():
            raise UserError(f"projector file not found: {path}")
        data = path.read_bytes()
    if path.suffix == ".safetensors":
        from safetensors.torch import load

        try:
            sd = load(data)
        except Exception as e:  # a truncated or foreign file
            raise UserError(f"cannot read projector {path}: {first_line(e)}") from None
    else:
        try:
            sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors carry multi-line text; keep one line
            raise UserError(f"cannot read projector checkpoint {path} with weights_only=True: {first_line(e)}") from None
    return projector_from_state_dict(sd)

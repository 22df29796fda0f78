"""Rows that need no re-encoding: other checkpoints, weight averages and embedding ensembles.

All of them map the cached DINOv2 features through projectors (or reuse the teacher's image
embeddings), so a per-epoch curve over 16 checkpoints costs 16 small MLP passes, not 16 runs of
DINOv2. A checkpoint is only comparable if it was trained on the same DINOv2 features and for the
same CLIP text tower: model directories are checked for that, bare projector files by their dims.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dinov2clip import identity
from dinov2clip.config import CONFIG_FILE, read_config
from dinov2clip.errors import UserError
from dinov2clip.projector import load_projector, projector_from_state_dict

MODEL, TEACHER = "model", "clip"  # ensemble members naming the evaluated model and its teacher


@dataclass
class Variant:
    name: str
    kind: str  # checkpoint | weight-average | ensemble
    sources: list[str]
    embed: Callable[[np.ndarray, np.ndarray], torch.Tensor] = field(repr=False)  # (features, teacher) → [N, D]
    epoch: int | None = None


def load_variants(model, checkpoints=(), weight_averages=(), ensembles=()) -> list[Variant]:
    """Load and check every projector before any image is embedded: mistakes fail in seconds."""
    out = []
    for path in checkpoints:
        projector = _checked_projector(path, model)
        out.append(Variant(_label(path), "checkpoint", [str(path)], _projecting(projector, model), _epoch(path)))
    for group in weight_averages:
        if len(group) < 2:
            raise UserError("--weight-average needs at least two checkpoints")
        projectors = [_checked_projector(p, model) for p in group]
        averaged = _average_weights(projectors, group)
        out.append(Variant(f"wavg({', '.join(map(_label, group))})", "weight-average", list(map(str, group)),
                           _projecting(averaged, model)))
    for group in ensembles:
        if len(group) < 2:
            raise UserError("--ensemble needs at least two members")
        members = [_member(m, model) for m in group]
        out.append(Variant(f"ens({', '.join(_label(m) if m not in (MODEL, TEACHER) else m for m in group)})",
                           "ensemble", list(map(str, group)), _ensembling(members)))
    names = [v.name for v in out]
    for v in out:
        if names.count(v.name) > 1:
            raise UserError(f"two rows would be named {v.name!r}: rename one of the files")
    return out


def _label(path) -> str:
    path = Path(path)
    return path.name if path.is_dir() else path.stem


def _epoch(path) -> int | None:
    match = re.search(r"epoch[_-]?(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def _checked_projector(path, model):
    path = Path(path)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        theirs = read_config(path)
        if identity.encoders(theirs) != model.encoder_fingerprint:
            raise UserError(f"{path}: built on {identity.label(theirs)}, the evaluated model on "
                            f"{identity.label(model.config)}: its embeddings are not comparable")
    projector = load_projector(path)
    got, want = projector.config, model.projector.config
    if (got.input_dim, got.output_dim) != (want.input_dim, want.output_dim):
        raise UserError(f"{path}: projector maps {got.input_dim}→{got.output_dim}, the evaluated model's "
                        f"{want.input_dim}→{want.output_dim}")
    return projector


def _average_weights(projectors, paths):
    """Uniform average of the state dicts (same architecture required)."""
    first = projectors[0].config
    for p, path in zip(projectors[1:], paths[1:]):
        if p.config != first:
            raise UserError(f"{path}: architecture {p.config} differs from {paths[0]}'s {first}: cannot average")
    states = [p.state_dict() for p in projectors]
    return projector_from_state_dict({k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]})


def _projecting(projector, model):
    """Same arithmetic as `DinoV2Clip.project`: fp32 on the model's device, then L2-normalised."""
    projector = projector.to(model.device).eval()

    @torch.inference_mode()
    def embed(features: np.ndarray, teacher: np.ndarray, batch: int = 4096) -> torch.Tensor:
        x = torch.from_numpy(features)
        return torch.cat([F.normalize(projector(x[i:i + batch].to(model.device)).float(), dim=-1).cpu()
                          for i in range(0, len(x), batch)])
    return embed


def _member(name, model):
    if name == MODEL:
        return lambda features, teacher: model.project(features).cpu()
    if name == TEACHER:
        return lambda features, teacher: torch.from_numpy(teacher)
    return _projecting(_checked_projector(name, model), model)


def _ensembling(members):
    """Mean of the members' L2-normalised embeddings, normalised again."""
    def embed(features: np.ndarray, teacher: np.ndarray) -> torch.Tensor:
        return F.normalize(torch.stack([m(features, teacher) for m in members]).mean(0), dim=-1)
    return embed

"""Precomputed embeddings for training: per-shard float16 memmaps, pooled on the fly.

Nothing is loaded whole unless asked: each batch gathers its rows from the shards' memmaps (the
page cache does the rest). `resident=True` copies everything into one tensor on the training
device instead (GPU-resident when it fits). Row order is the shards' name order, then row order.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dinov2clip import identity
from dinov2clip.dinov2 import check_pooling, pool
from dinov2clip.errors import UserError

from .shards import ARRAYS, META, TEXT, check_one_encoder, manifest


class EmbeddingSet:
    """All precomputed shards under one or more directories, as (input, clip_image, clip_text) rows."""

    def __init__(self, dirs: Sequence[str | Path], pooling: str, resident: bool = False, device="cpu"):
        check_pooling(pooling)
        self.pooling = pooling
        self.manifests = [manifest(d) for d in dirs]
        found: dict[str, list[str]] = {}
        for man in self.manifests:
            for meta in man["shards"]:
                found.setdefault(str(identity.of_shard(meta)), []).append(meta["name"])
        self.encoder_fingerprint = check_one_encoder(found, ", ".join(map(str, dirs)))
        self.shards = []
        for d, man in zip(dirs, self.manifests):
            for meta in man["shards"]:
                if meta["count"]:
                    root = Path(d) / "shards" / meta["name"]
                    self.shards.append({"root": root, "meta": meta, **{k: np.load(root / f"{k}.npy", mmap_mode="r")
                                        for k in ARRAYS}})
        if not self.shards:
            raise UserError(f"no samples in {', '.join(map(str, dirs))}")
        patches = {s["meta"]["num_patches"] for s in self.shards}
        if len(patches) > 1 and pooling != "cls":
            raise UserError(f"shards disagree on the number of DINOv2 patches ({sorted(patches)}): "
                            "they were precomputed with different models or resolutions")
        self.num_patches = patches.pop()
        # Images without captions (`fit`): the teacher's image embedding stands in for the text side, so
        # validation recall measures how often a projected image finds its own teacher embedding.
        captioned = {bool(s["meta"].get("captioned", True)) for s in self.shards}
        if len(captioned) > 1:
            raise UserError(f"{', '.join(map(str, dirs))} mixes captioned shards with image-only ones")
        self.captioned = captioned.pop()
        self.counts = np.array([s["meta"]["count"] for s in self.shards])
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.device = torch.device(device)
        self._resident = None
        if resident:
            self._resident = self._gather(np.arange(len(self)), self.device)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def data_sha256(self) -> str:
        import hashlib

        return hashlib.sha256("".join(m["sha256"] for m in self.manifests).encode()).hexdigest()

    @property
    def input_dim(self) -> int:
        return self.shards[0]["dinov2_cls"].shape[1] * (2 if self.pooling == "cls+mean" else 1)

    @property
    def output_dim(self) -> int:
        return self.shards[0]["clip_image"].shape[1]

    @property
    def encoders(self) -> dict | None:
        return self.shards[0]["meta"].get("encoders")

    def captions(self) -> list[str]:
        out = []
        for s in self.shards:
            out += json.loads((s["root"] / TEXT).read_text())["captions"]
        return out

    def rows(self, index, keys: Sequence[str] = ARRAYS) -> dict[str, np.ndarray]:
        """The stored float16 rows at global `index`, in `index` order. The rows are gathered in sorted
        order, each shard's into one contiguous slice (`np.take(out=)`, no mask per shard); an unsorted
        `index` costs one more in-memory permutation, so callers that may reorder pass a sorted one."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range 0..{len(self) - 1}")
        order = None if (np.diff(index) >= 0).all() else np.argsort(index, kind="stable")
        ordered = index if order is None else index[order]
        bounds = np.searchsorted(ordered, self.offsets)  # shard s holds ordered[bounds[s]:bounds[s + 1]]
        present = np.flatnonzero(bounds[1:] > bounds[:-1])
        out = {}
        for k in keys:
            buf = np.empty((len(index), self.shards[0][k].shape[1]), np.float16)
            for s in present:
                lo, hi = bounds[s], bounds[s + 1]
                np.take(self.shards[s][k], ordered[lo:hi] - self.offsets[s], axis=0, out=buf[lo:hi], mode="clip")
            if order is not None:
                unsorted = np.empty_like(buf)
                unsorted[order] = buf
                buf = unsorted
            out[k] = buf
        return out

    def _gather(self, index: np.ndarray, device=None):
        """Rows → float32 (pooled input, clip_image, clip_text) on `device`: float16 crosses to the device,
        the conversion and pooling happen there."""
        keys = [k for k in ARRAYS if not (k == "dinov2_patch_mean" and self.pooling == "cls")
                and not (k == "clip_text" and not self.captioned)]
        t = {k: torch.from_numpy(v).to(device or self.device, non_blocking=True).float()
             for k, v in self.rows(index, keys).items()}
        x = pool(t["dinov2_cls"], t.get("dinov2_patch_mean"), self.pooling, self.num_patches)
        return x, t["clip_image"], t["clip_text"] if self.captioned else t["clip_image"]

    def batch(self, index) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._resident is not None:
            idx = torch.as_tensor(np.asarray(index), dtype=torch.long, device=self.device)
            return tuple(t[idx] for t in self._resident)
        return self._gather(np.asarray(index))

    def all(self):
        return self.batch(np.arange(len(self)))


def meta_of(shard_dir: Path) -> dict:
    return json.loads((Path(shard_dir) / META).read_text())

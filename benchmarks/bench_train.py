#!/usr/bin/env python
"""Training benchmark (CPU): the memmap loader's samples/s beside a naive per-sample DataLoader, the
reference projector's training-step samples/s in fp32 and bf16 autocast, and the cost of GradCache
(contrastive loss, 4 micro-batches: exact accumulation against plain, side by side).

    python benchmarks/bench_train.py                    # 400k synthetic pairs (~2 GB on disk under --dir)
    python benchmarks/bench_train.py --quick            # 100k pairs, fewer steps
    python benchmarks/bench_train.py --out bench_results/train.json

Data: per-shard float16 memmaps in the precompute format (768-d DINOv2 CLS and patch mean, 512-d CLIP
image and text), random values. Loader = `training.data.EmbeddingSet` over those memmaps (shuffled
global batches, pooled to 'mean', a no-op consumer), page-cache mode and resident (in-RAM) mode. Naive =
a `torch.utils.data.Dataset` returning one row per `__getitem__`, `DataLoader(shuffle=True)`, timed on
a prefix. A benchmark, not a test: it prints figures and the 500k samples/s target, it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import EmbeddingSet  # noqa: E402
from training.shards import write_shard  # noqa: E402

LOADER_TARGET = 500_000


def make_data(root: Path, n: int, per_shard: int = 10_000, seed: int = 0) -> None:
    """img2dataset's default shard size (10k), so a batch gathers from many shards, as on CC12M."""
    counts = [json.loads(p.read_text())["count"] for p in (root / "shards").glob("*/meta.json")]
    if sum(counts) == n and len(counts) == -(-n // per_shard):
        return
    if (root / "shards").is_dir():
        import shutil

        shutil.rmtree(root / "shards")
    rng = np.random.default_rng(seed)
    for s, start in enumerate(range(0, n, per_shard)):
        m = min(per_shard, n - start)
        arrays = {"dinov2_cls": rng.standard_normal((m, 768), np.float32), "dinov2_patch_mean":
                  rng.standard_normal((m, 768), np.float32), "clip_image": rng.standard_normal((m, 512), np.float32),
                  "clip_text": rng.standard_normal((m, 512), np.float32)}
        write_shard(root, f"bench-{s:05d}", arrays, [str(i) for i in range(m)], [""] * m,
                    {"num_patches": 256, "skipped": 0, "skipped_keys": {}})


def bench_loader(root: Path, batch: int, mode: str) -> float:
    """mode: 'rows' = shuffled float16 batches from the memmaps (what crosses to the device); 'pooled' = plus
    the float32 conversion and pooling on the CPU; 'resident' = batches from one in-RAM float32 tensor."""
    data = EmbeddingSet([root], "mean", resident=mode == "resident")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).numpy()
    get = data.rows if mode == "rows" else data.batch
    t = time.perf_counter()
    n = 0
    for i in range(0, len(data) - batch + 1, batch):
        get(np.sort(perm[i:i + batch]))  # as train does: sorted rows gather without a permutation
        n += batch
    return n / (time.perf_counter() - t)


class _RowDataset(torch.utils.data.Dataset):
    def __init__(self, data: EmbeddingSet):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        s = int(np.searchsorted(self.data.offsets, i, side="right") - 1)
        r = i - self.data.offsets[s]
        sh = self.data.shards[s]
        cls, pm = (torch.from_numpy(np.asarray(sh[k][r], np.float32)) for k in ("dinov2_cls", "dinov2_patch_mean"))
        return (cls + 256 * pm) / 257, torch.from_numpy(np.asarray(sh["clip_image"][r], np.float32)), \
            torch.from_numpy(np.asarray(sh["clip_text"][r], np.float32))


def bench_naive(root: Path, batch: int, limit: int) -> float:
    loader = torch.utils.data.DataLoader(_RowDataset(EmbeddingSet([root], "mean")), batch_size=batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    t, n = time.perf_counter(), 0
    for x, _, _ in loader:
        n += len(x)
        if n >= limit:
            break
    return n / (time.perf_counter() - t)


def bench_step(dtype: str, batch: int, steps: int) -> float:
    from dinov2clip.projector import ProjectorWithResiduals
    from training.losses import unit_mse

    torch.manual_seed(0)
    proj = ProjectorWithResiduals(768, 512, 2048, 6)
    opt = torch.optim.AdamW(proj.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 768), torch.randn(batch, 512)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            pred = proj(x)
        loss = unit_mse(pred, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t)


def bench_accumulation(root: Path, cached: bool, batch: int, accum: int, steps: int) -> float:
    """Contrastive training steps with `accum` micro-batches: GradCache (exact, one extra forward) or plain."""
    import contextlib

    from dinov2clip.projector import ProjectorWithResiduals
    from training.losses import Trainee
    from training.train import TrainConfig, _accumulated_backward, _cached_backward

    torch.manual_seed(0)
    data = EmbeddingSet([root], "mean", resident=True)
    module = Trainee(ProjectorWithResiduals(768, 512, 2048, 6), contrastive=True)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    cfg = TrainConfig(mse_weight=0.0, contrastive_weight=1.0, accum_steps=accum, grad_cache=cached)
    backward = _cached_backward if cached else _accumulated_backward
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).numpy()
    micro = batch // accum

    def step(i):
        idx = perm[i * batch:(i + 1) * batch]
        opt.zero_grad(set_to_none=True)
        backward(module, module, data, [idx[m * micro:(m + 1) * micro] for m in range(accum)], cfg,
                 contextlib.nullcontext())
        opt.step()

    step(0)  # warm-up
    t = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    return steps * batch / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "dinov2clip-bench-train")
    ap.add_argument("--out", type=Path, default=Path("bench_results/train.json"))
    ap.add_argument("--batch", type=int, default=8192)
    args = ap.parse_args(argv)
    n = 100_000 if args.quick else 400_000
    make_data(args.dir, n)
    res = {"samples": n, "batch": args.batch, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
           "load_average": os.getloadavg(), "torch": torch.__version__}
    bench_loader(args.dir, args.batch, "rows")  # warm the page cache
    res["loader_memmap_fp16_rows_samples_per_s"] = bench_loader(args.dir, args.batch, "rows")
    res["loader_memmap_pooled_fp32_samples_per_s"] = bench_loader(args.dir, args.batch, "pooled")
    res["loader_resident_samples_per_s"] = bench_loader(args.dir, args.batch, "resident")
    res["naive_dataloader_samples_per_s"] = bench_naive(args.dir, 256, 20_000 if args.quick else 50_000)
    steps = 3 if args.quick else 10
    res["step_fp32_samples_per_s"] = bench_step("fp32", 256, steps)
    res["step_bf16_samples_per_s"] = bench_step("bf16", 256, steps)
    # GradCache's cost, side by side: contrastive, 4 micro-batches of 256, cached (exact) vs plain
    res["step_contrastive_accum4_plain_samples_per_s"] = bench_accumulation(args.dir, False, 1024, 4, steps)
    res["step_contrastive_accum4_gradcache_samples_per_s"] = bench_accumulation(args.dir, True, 1024, 4, steps)
    res["gradcache_relative_speed"] = (res["step_contrastive_accum4_gradcache_samples_per_s"]
                                       / res["step_contrastive_accum4_plain_samples_per_s"])
    res["loader_target_samples_per_s"] = LOADER_TARGET
    for k, v in res.items():
        print(f"{k:48s} {v:,.0f}" if isinstance(v, float) and v >= 10 else f"{k:48s} {v:.3g}" if isinstance(v, float)
              else f"{k:48s} {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

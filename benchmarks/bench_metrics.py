#!/usr/bin/env python
"""Retrieval-metric benchmark: `training.metrics.retrieval_recall` on a COCO-5k-test-sized problem.

    python benchmarks/bench_metrics.py            # 5,000 images × 25,000 captions, D = 512, fp32
    python benchmarks/bench_metrics.py --large    # also 100,000 images × 20,000 captions, D = 64: memory stays flat
    python benchmarks/bench_metrics.py --clip-benchmark   # also time CLIP_benchmark's own metric code

Targets (issue "Evaluation"): COCO 5k test in ≤ 1.5 s with ≤ 256 MB peak extra memory. Prints figures,
asserts nothing. The GEMM alone (the same product, chunked, no ranking) is printed as the floor: one
GEMM serves both directions, so the metric can be no faster than it. Peak extra memory = the peak
resident set during the call minus the resident set before it (Linux: VmHWM reset through
/proc/self/clear_refs). Load average is printed because a busy machine slows every figure.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from training.metrics import retrieval_recall  # noqa: E402


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_extra_mb(fn) -> float | None:
    """Peak RSS during fn() minus RSS before it, in MB; None where the kernel cannot reset the peak.

    Meaningful because main() runs with MALLOC_MMAP_THRESHOLD_ set: glibc then returns every large
    freed block to the OS at once, so the resident set before the call holds no reusable free memory."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kb("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return (_status_kb("VmHWM") - before) / 1024


def problem(n_img: int, n_txt: int, dim: int, seed: int = 0):
    """Captions spread evenly over the first images (the rest are distractors), in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_img, dim, generator=g), dim=-1)
    ids = (torch.arange(n_txt) % n_img)[torch.randperm(n_txt, generator=g)]
    # Captions near their image, so recalls are neither 0 nor 1.
    texts = F.normalize(images[ids] + 8 * torch.randn(len(ids), dim, generator=g) / dim ** 0.5, dim=-1)
    return images, texts, ids


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def gemm_only(images, texts, rows: int = 1024):
    out = torch.empty(rows, len(images))
    for s in range(0, len(texts), rows):
        chunk = texts[s:s + rows]
        torch.mm(chunk, images.T, out=out[:len(chunk)])


def clip_benchmark_metric(images, texts, ids, ks):
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), ids] = True
    return {k: ((batchify(recall_at_k, scores, positive, 64, "cpu", k=k) > 0).float().mean().item(),
                (batchify(recall_at_k, scores.T, positive.T, 64, "cpu", k=k) > 0).float().mean().item())
            for k in ks}


def run(name: str, n_img: int, n_txt: int, dim: int, repeats: int, compare: bool) -> None:
    images, texts, ids = problem(n_img, n_txt, dim)
    print(f"\n{name}: {n_img:,} images × {len(texts):,} captions, D = {dim}, fp32, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    result = {}
    extra = peak_extra_mb(lambda: result.update(retrieval_recall(images, texts, ids)))
    times = timed(lambda: retrieval_recall(images, texts, ids), repeats)
    floor = timed(lambda: gemm_only(images, texts), repeats)
    print(f"  retrieval_recall  best {min(times):.3f} s, median {statistics.median(times):.3f} s "
          f"over {repeats} runs; peak extra memory "
          + ("n/a (cannot reset VmHWM)" if extra is None else f"{extra:.0f} MB"))
    print(f"  GEMM alone        best {min(floor):.3f} s, median {statistics.median(floor):.3f} s")
    print("  recalls           " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    if compare:
        t0 = time.perf_counter()
        theirs = clip_benchmark_metric(images, texts, ids, (1, 5, 10))
        took = time.perf_counter() - t0
        same = all(abs(theirs[k][0] - result[f"image_retrieval_recall@{k}"]) < 0.5 / len(texts)
                   and abs(theirs[k][1] - result[f"text_retrieval_recall@{k}"]) < 0.5 / n_img for k in theirs)
        print(f"  CLIP_benchmark    {took:.1f} s (full score matrix + top-k); same recalls: {same}")


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # see peak_extra_mb; glibc reads it at start-up
        os.execv(sys.executable, [sys.executable, *sys.argv])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1], allow_abbrev=False)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--large", action="store_true", help="also run 100,000 images × 20,000 captions, D = 64")
    p.add_argument("--clip-benchmark", action="store_true", help="also time CLIP_benchmark's metric code")
    args = p.parse_args()
    torch.manual_seed(0)
    run("COCO 5k test size", 5000, 25_000, 512, args.repeats, args.clip_benchmark)
    if args.large:
        run("large", 100_000, 20_000, 64, 2, False)


if __name__ == "__main__":
    main()

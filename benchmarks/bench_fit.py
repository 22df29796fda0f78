#!/usr/bin/env python
"""`fit` on the CPU: its encoding images/s beside precompute's on the same images (one decode/encode path,
`precompute_shard`, so they should match), the projector's training samples/s, and what a fit of 10,000
images costs here, split into encoding and training (is training the bottleneck?).

    python benchmarks/bench_fit.py                     # reference-size random model, 32 and 96 JPEGs, 2 repeats
    python benchmarks/bench_fit.py --quick             # the tiny model, 21 and 64 JPEGs, 1 repeat (CI: it runs)

Images: random-noise JPEGs 320×240, as files for fit and in one webdataset tar (with captions) for
precompute; images/s is the marginal rate between a third of --images and --images (model loading and other
fixed costs cancel); each repeat starts from empty caches, in ABBA order. Training: `fit`'s own
train config (MSE, the reference projector 768→2048×6→512 at reference size) on synthetic features of
the precompute format. A benchmark, not a test: it prints figures, it asserts nothing.
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import cpu_name, reference_model_dir  # noqa: E402
from report import publish  # noqa: E402


def write_images(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder, tar_path = root / "images", root / "images.tar"
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
            (folder / f"{i:05d}.jpg").write_bytes(buf.getvalue())
            for name, data in ((f"{i:05d}.jpg", buf.getvalue()), (f"{i:05d}.txt", b"a photo")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder, tar_path


def time_precompute(model: str, root: Path, work: Path, args) -> float:
    from training.precompute import precompute

    start = time.perf_counter()
    summary = precompute(model, [str(root / "images.tar")], work, batch_size=args.batch_size, dtype=args.dtype,
                         device="cpu", workers=args.workers, progress=False)
    assert summary["samples"] == len(list((root / "images").iterdir())), summary
    return time.perf_counter() - start


def time_fit_encode(model: str, root: Path, cache: Path, args) -> float:
    from training import fit

    start = time.perf_counter()
    images = fit.hash_images(fit.find_images([root / "images"]))
    features = fit.feature_dir(model, "cpu", args.dtype, cache)
    encoding = fit.Encoding(model, "cpu", args.dtype, args.batch_size, args.workers, progress=False)
    train, val = fit.split(images, fit.VAL_PERCENT)
    fit.encode(images, train, features, encoding)
    fit.encode(images, val, features, encoding)
    assert encoding.encoded == len(images.paths)
    return time.perf_counter() - start


def time_training(work: Path, args) -> float:
    """Samples/s of fit's training (its TrainConfig: MSE, one epoch) on synthetic precompute-format rows."""
    from training.shards import write_shard
    from training.train import TrainConfig, train

    rng = np.random.default_rng(0)
    dims = (768, 512) if not args.quick else (32, 32)
    hidden, blocks = (2048, 6) if not args.quick else (64, 2)
    for split, n in (("train", args.train_rows), ("val", 256)):
        arrays = {"dinov2_cls": rng.standard_normal((n, dims[0]), np.float32),
                  "dinov2_patch_mean": rng.standard_normal((n, dims[0]), np.float32),
                  "clip_image": rng.standard_normal((n, dims[1]), np.float32),
                  "clip_text": np.zeros((n, dims[1]), np.float32)}
        write_shard(work / split, "rows", arrays, [str(i) for i in range(n)], [""] * n,
                    {"num_patches": 256, "captioned": False, "encoders": {"fingerprint": "bench"}})
    cfg = TrainConfig(train=[str(work / "train")], val=[str(work / "val")], out=str(work / "run"), hidden_dim=hidden,
                      num_blocks=blocks, epochs=1, batch_size=256, mse_weight=1.0, contrastive_weight=0.0,
                      device="cpu", progress=False)
    start = time.perf_counter()
    summary = train(cfg)
    return args.train_rows / (time.perf_counter() - start) if summary is not None else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny model, 64 images, 1 repeat")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--train-rows", type=int, default=None)
    p.add_argument("--model-dir", default=None, help="reuse (or build) the reference-size random model here")
    p.add_argument("--out", default="bench_results/fit.json")
    args = p.parse_args()
    args.images = args.images or (64 if args.quick else 96)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.train_rows = args.train_rows or (2048 if args.quick else 8192)

    import torch

    from dinov2clip.model import resolve_dtype

    home = Path(tempfile.mkdtemp(prefix="bench-fit-"))
    try:
        if args.quick:
            import dinov2clip

            model = str(dinov2clip.make_tiny(str(home / "tiny"), seed=0))
        else:
            model = str(reference_model_dir(args.model_dir, home))
        sizes = {"small": args.images // 3, "large": args.images}
        for size, n in sizes.items():
            write_images(home / size, n)
        rates, seconds = {"precompute": [], "fit": []}, {}
        for r in range(args.repeats):  # ABBA order: a drift in the machine's speed hits both alike
            order = ("precompute", "fit") if r % 2 == 0 else ("fit", "precompute")
            for which in order:
                for size in sizes:  # the marginal rate between two sizes leaves out fixed costs (loading)
                    timer = time_precompute if which == "precompute" else time_fit_encode
                    seconds[which, size] = timer(model, home / size, home / f"{which}-{size}-{r}", args)
                rates[which].append((sizes["large"] - sizes["small"]) /
                                    (seconds[which, "large"] - seconds[which, "small"]))
            print(f"repeat {r + 1}: marginal images/s: precompute {rates['precompute'][-1]:.2f}, fit "
                  f"{rates['fit'][-1]:.2f} (whole runs of {sizes['large']}: {seconds['precompute', 'large']:.1f} s and "
                  f"{seconds['fit', 'large']:.1f} s)", flush=True)
        train_rate = time_training(home / "train", args)
    finally:
        shutil.rmtree(home, ignore_errors=True)

    pre, enc = float(np.median(rates["precompute"])), float(np.median(rates["fit"]))
    epochs = 10  # fit's default
    encode_s, train_s = 10_000 / enc, 10_000 * 0.9 * epochs / train_rate
    dtype = str(resolve_dtype(args.dtype, "cpu")).removeprefix("torch.")
    table = "\n".join([
        "| | images/s (median of marginal rates) | ratio |", "| --- | --- | --- |",
        f"| precompute (webdataset tar) | {pre:.2f} | 1.00 |",
        f"| fit's encoding (image files) | {enc:.2f} | {enc / pre:.2f} |",
        "", "| fit of 10,000 images (fit defaults: 10 epochs, 10 % held out) | seconds |", "| --- | --- |",
        f"| encoding (DINOv2 + CLIP teacher) | {encode_s:.0f} |",
        f"| projector training ({train_rate:.0f} samples/s) | {train_s:.0f} |",
    ])
    notes = (f"{'tiny' if args.quick else 'reference-size'} random model, marginal rate between {args.images // 3} "
             f"and {args.images} JPEGs 320×240, batch "
             f"{args.batch_size}, {args.workers} decode threads, dtype {dtype}, {args.repeats} repeat(s); "
             f"{torch.get_num_threads()} torch threads on {cpu_name()}.")
    publish({"precompute_images_per_s": rates["precompute"], "fit_images_per_s": rates["fit"],
             "train_samples_per_s": train_rate, "fit_10k_encode_s": encode_s, "fit_10k_train_s": train_s,
             "dtype": dtype, "quick": args.quick, "images": args.images}, table, notes, args.out)


if __name__ == "__main__":
    main()

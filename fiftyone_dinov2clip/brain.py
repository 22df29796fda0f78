"""Embeddings and similarity indexes on FiftyOne datasets, by registered model name.

One pass over the images writes both the CLIP-space embedding (text search) and, optionally, the
DINOv2 embedding it was projected from (image↔image similarity, near-duplicates, clustering). Each
field records what produced it in its `info["dinov2clip"]`, so an index never mixes two embedding
spaces and a DINOv2 field is only projected by a projector trained on the same kind of input.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import secrets
from dataclasses import dataclass, field

import numpy as np

import fiftyone.brain as fob
import fiftyone.core.utils as fou
import fiftyone.zoo as foz

from dinov2clip.embed import iter_pixel_batches
from dinov2clip.errors import UserError

from . import registry
from .index_defaults import LANCEDB_FROM
from .vector_cache import CachedSklearnSimilarityConfig
from .zoo import DinoV2ClipModel

logger = logging.getLogger(__name__)
INFO_KEY = "dinov2clip"
DEFAULT_FIELD = "dinov2clip"
DEFAULT_BRAIN_KEY = "dinov2clip"


@dataclass
class EmbedReport:
    embedded: int = 0
    skipped_existing: int = 0
    failed: list = field(default_factory=list)  # (filepath, reason)

    def __str__(self) -> str:
        s = f"embedded {self.embedded} images, {len(self.failed)} unreadable (skipped)"
        return s + (f", {self.skipped_existing} already had embeddings" if self.skipped_existing else "")


def load(model="dinov2clip-reference", **kwargs) -> DinoV2ClipModel:
    """A registered zoo model by name (`name` = latest version, or `name@N`), or an instance as is."""
    if isinstance(model, DinoV2ClipModel):
        return model
    return foz.load_zoo_model(registry.resolve(model), **kwargs)


def _zoo_name(model) -> str | None:
    return model.config.zoo_name if isinstance(model, DinoV2ClipModel) else registry.resolve(model)


def _schema_field(samples, path: str):
    """The field as the dataset stores it (a frames view's fields live on its video dataset's frames)."""
    if samples._is_frames:
        return samples._root_dataset.get_field("frames." + path)
    return samples._root_dataset.get_field(path)


def _field_info(samples, path: str) -> dict | None:
    f = _schema_field(samples, path)
    return None if f is None else (f.info or {}).get(INFO_KEY)


def _set_field_info(samples, path: str, info: dict) -> None:
    f = _schema_field(samples, path)
    f.info = {**(f.info or {}), INFO_KEY: info}
    f.save()


def _check_field(samples, path: str, info: dict) -> None:
    """Refuse to add embeddings of one space to a field holding another's."""
    have = _field_info(samples, path)
    if samples.get_field(path) is None:
        return
    if have is None:
        if samples.exists(path).count():
            raise UserError(f"field {path!r} already holds values not written by dinov2clip: choose another field")
        return
    if have.get("fingerprint") != info.get("fingerprint") or have.get("space") != info.get("space"):
        raise UserError(f"field {path!r} holds {have.get('space')} embeddings of {have.get('model')} "
                        f"(fingerprint {str(have.get('fingerprint'))[:12]}); these would be {info['space']} "
                        f"embeddings of {info['model']} (fingerprint {info['fingerprint'][:12]}): use another "
                        "field, or delete it first")


def compute_embeddings(samples, model="dinov2clip-reference", embeddings_field: str = DEFAULT_FIELD,
                       dinov2_field: str | None = None, batch_size: int | None = None,
                       num_workers: int | None = None, skip_existing: bool = True,
                       progress: bool | None = None) -> EmbedReport:
    """Embed every image of `samples` lacking `embeddings_field` (or `dinov2_field`), in one pass.

    An unreadable image gets no embedding and is reported in `EmbedReport.failed`; every other image
    of its batch is embedded. Works on datasets, views and frames views (`to_frames`)."""
    model = load(model)
    core = model.core(image=True)
    zoo_name = _zoo_name(model)
    clip_info = {"space": "clip", "model": zoo_name, "fingerprint": core.fingerprint,
                 "encoder_fingerprint": core.encoder_fingerprint,
                 "clip": f"{core.config.clip['model_name']}/{core.config.clip.get('pretrained')}"}
    dino_info = {"space": "dinov2", "model": zoo_name, "fingerprint": core.fingerprint, **core.dinov2_provenance}
    _check_field(samples, embeddings_field, clip_info)
    if dinov2_field:
        _check_field(samples, dinov2_field, dino_info)

    report = EmbedReport()
    todo = samples
    if skip_existing:
        existing = [f for f in (embeddings_field, dinov2_field) if f and samples.get_field(f) is not None]
        if existing:  # samples lacking a value in any of the fields that exist
            from fiftyone import ViewField as F

            expr = F(existing[0]) == None  # noqa: E711  (a MongoDB expression, not a Python comparison)
            for f in existing[1:]:
                expr = expr | (F(f) == None)  # noqa: E711
            todo = samples.match(expr)
            report.skipped_existing = len(samples) - len(todo)
    ids, paths = todo.values(["id", "filepath"])
    batch_size = batch_size or model.config.batch_size
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers

    claimed = False
    with fou.ProgressBar(total=len(ids), progress=progress) as bar:
        for idx, pixels, failures in iter_pixel_batches(core.preprocess, paths, batch_size, workers):
            for i, reason in failures:
                logger.warning("dinov2clip: skipped unreadable image %s: %s", paths[i], reason)
                report.failed.append((paths[i], reason))
            if pixels is not None:
                emb, dino = core.encode_image(pixels, return_dinov2=True)
                batch_ids = [ids[i] for i in idx]
                todo.set_values(embeddings_field, dict(zip(batch_ids, emb.numpy())), key_field="id")
                if dinov2_field:
                    todo.set_values(dinov2_field, dict(zip(batch_ids, dino.numpy())), key_field="id")
                if not claimed:  # provenance with the first values, so an interrupted run resumes
                    _set_field_info(samples, embeddings_field, clip_info)
                    if dinov2_field:
                        _set_field_info(samples, dinov2_field, dino_info)
                    claimed = True
                report.embedded += len(idx)
            bar.update(len(idx) + len(failures))

    if samples.get_field(embeddings_field) is not None:
        _set_field_info(samples, embeddings_field, clip_info)
    if dinov2_field and samples.get_field(dinov2_field) is not None:
        _set_field_info(samples, dinov2_field, dino_info)
    if report.failed:
        logger.warning("dinov2clip: %d unreadable images skipped", len(report.failed))
    return report


def compute_similarity(samples, model="dinov2clip-reference", brain_key: str = DEFAULT_BRAIN_KEY,
                       embeddings_field: str = DEFAULT_FIELD, dinov2_field: str | None = None,
                       dinov2_brain_key: str | None = None, patches_field: str | None = None,
                       backend: str | None = None, batch_size: int | None = None, num_workers: int | None = None,
                       overwrite: bool = False, progress: bool | None = None, **backend_kwargs):
    """Text-searchable similarity index over `samples`, recorded with the model's `name@version`.

    With `dinov2_field` the DINOv2 embeddings of the same pass are stored too, and with
    `dinov2_brain_key` a second, image-only index is built over them. With `patches_field` the
    objects' crops are embedded (FiftyOne's own patch pipeline, calling this model).

    Returns `(results, report)`: the text index and an `EmbedReport` (None for patches)."""
    if dinov2_brain_key and not dinov2_field:
        raise UserError("a DINOv2 index (dinov2_brain_key) needs the DINOv2 embeddings stored: pass dinov2_field")
    backend_kwargs = {**similarity_backend(backend, len(samples)), **backend_kwargs}
    zoo_name = registry.resolve(model) if isinstance(model, str) else model.config.zoo_name
    if zoo_name is None:
        raise UserError("pass a registered model name, not an instance: the App reloads the model by name")
    dataset = samples._root_dataset
    keys = [k for k in (brain_key, dinov2_brain_key) if k]
    for key in keys:
        if key in dataset.list_brain_runs() and not overwrite:
            raise UserError(f"brain key {key!r} exists on dataset {dataset.name!r}: pass overwrite=True "
                            "(--overwrite) or choose another key")
    if any(k in backend_kwargs for k in STORAGE_NAMES):
        # the new text index would write into the old one's named table: the old run must go first
        for key in keys:
            if key in dataset.list_brain_runs():
                dataset.delete_brain_run(key)
    # New runs are built under temporary keys and replace the old ones only once all exist: a failed or
    # interrupted run leaves the old indexes as they were and no half-registered key.
    tmp = {key: f"{key}_new{secrets.token_hex(3)}" for key in keys}
    try:
        if patches_field:
            results = fob.compute_similarity(samples, patches_field=patches_field, model=zoo_name,
                                             embeddings=embeddings_field, batch_size=batch_size or 32,
                                             num_workers=num_workers, progress=progress,
                                             brain_key=tmp[brain_key], **backend_kwargs)
            report = None
        else:
            report = compute_embeddings(samples, zoo_name, embeddings_field, dinov2_field, batch_size=batch_size,
                                        num_workers=num_workers, progress=progress)
            results = fob.compute_similarity(samples, embeddings=embeddings_field, model=zoo_name,
                                             brain_key=tmp[brain_key], **backend_kwargs)
            if dinov2_field and dinov2_brain_key:
                fob.compute_similarity(samples, embeddings=dinov2_field,
                                       brain_key=tmp[dinov2_brain_key], **_second_index(backend_kwargs))
    except BaseException:
        for key in tmp.values():
            if key in dataset.list_brain_runs():
                dataset.delete_brain_run(key)
        raise
    for key, new in tmp.items():
        if key in dataset.list_brain_runs():
            dataset.delete_brain_run(key)
        dataset.rename_brain_run(new, key)
    return results, report  # FiftyOne's rename updates the results' key and its results cache


def default_backend(n_samples: int) -> str:
    """FiftyOne's configured default if the user changed it; else sklearn, or lancedb from LANCEDB_FROM."""
    configured = fob.brain_config.default_similarity_backend
    if configured != "sklearn" or n_samples < LANCEDB_FROM:
        return configured
    if importlib.util.find_spec("lancedb") is None:
        logger.warning("dinov2clip: %d samples: with lancedb installed (pip install lancedb) the index would be "
                       "LanceDB's and the App's first text query would not read every vector from MongoDB; "
                       "using sklearn", n_samples)
        return configured
    return "lancedb"


def similarity_backend(backend: str | type | None, n_samples: int = 0) -> dict:
    """`fob.compute_similarity`'s arguments naming what to build an index with. None: `default_backend(n_samples)`.
    sklearn becomes the same backend with its vectors kept in memory between App requests (`vector_cache`),
    lancedb the same backend searching views and answering id queries from memory (`lancedb_index`); any other
    is FiftyOne's own. The backend is named, our class given as its `config_cls`, so FiftyOne still applies
    the user's brain config for it (e.g. LanceDB's `uri`)."""
    if backend is None:
        backend = default_backend(n_samples)
    if backend == "lancedb":
        from .lancedb_index import CachedLanceDBSimilarityConfig

        return {"backend": backend, "config_cls": CachedLanceDBSimilarityConfig}
    if backend == "sklearn":
        return {"backend": backend, "config_cls": CachedSklearnSimilarityConfig}
    return {"backend": backend}


def project_field(samples, dinov2_field: str, model="dinov2clip-reference",
                  embeddings_field: str = DEFAULT_FIELD, provenance: dict | None = None,
                  batch_size: int = 4096) -> int:
    """Project DINOv2 embeddings already stored in `dinov2_field` into CLIP space, without the images.

    The field must say what it holds (written by `compute_embeddings(dinov2_field=...)`, or declared
    with `provenance={"source": ..., "pooling": ...}`) and match the projector's input; a mismatch is
    refused with the reason. Returns how many embeddings were written."""
    model = load(model)
    core = model.core()
    want = core.dinov2_provenance
    have = provenance or _field_info(samples, dinov2_field)
    if have is None:
        raise UserError(
            f"field {dinov2_field!r} does not say which DINOv2 and pooling produced it (FiftyOne's own "
            f"DINOv2 zoo models store CLS tokens; this projector takes {want['pooling']}-pooled "
            f"{want['source']} tokens): recompute it with compute_embeddings(dinov2_field=...), or pass "
            "provenance={'source': ..., 'pooling': ...} if you know it")
    if have.get("encoder_fingerprint") not in (None, want["encoder_fingerprint"]):
        raise UserError(f"field {dinov2_field!r} holds embeddings of encoders {have['encoder_fingerprint'][:12]}; "
                        f"{_zoo_name(model)} projects those of {want['encoder_fingerprint'][:12]}: recompute the "
                        "field with this model")
    for key in ("source", "pooling"):
        if have.get(key) != want[key]:
            raise UserError(f"field {dinov2_field!r} holds {have.get('pooling')}-pooled {have.get('source')} "
                            f"embeddings; {_zoo_name(model)} projects {want['pooling']}-pooled {want['source']} "
                            "embeddings: recompute the field with this model")
    view = samples.exists(dinov2_field)
    ids, values = view.values(["id", dinov2_field])
    info = {"space": "clip", "model": _zoo_name(model), "fingerprint": core.fingerprint,
            "encoder_fingerprint": core.encoder_fingerprint, "clip": f"{core.config.clip['model_name']}/{core.config.clip.get('pretrained')}"}
    _check_field(samples, embeddings_field, info)
    for start in range(0, len(ids), batch_size):
        x = np.stack(values[start:start + batch_size]).astype(np.float32)
        emb = core.project(x).cpu().numpy()
        view.set_values(embeddings_field, dict(zip(ids[start:start + batch_size], emb)), key_field="id")
    if ids:
        _set_field_info(samples, embeddings_field, info)
    return len(ids)


# Backend options that name one index's own storage: the text index keeps the user's; the DINOv2 index gets
# the backend's default name (derived from its brain key), so the two never write into one table.
STORAGE_NAMES = ("table_name", "collection_name", "index_name", "namespace")


def _second_index(backend_kwargs: dict) -> dict:
    return {k: v for k, v in backend_kwargs.items() if k not in STORAGE_NAMES}


def sort_by_text(samples, text: str, brain_key: str = DEFAULT_BRAIN_KEY, k: int | None = None):
    """`samples.sort_by_similarity(text)` with a clear error when the run cannot take text."""
    dataset = samples._root_dataset
    if brain_key not in dataset.list_brain_runs():
        raise UserError(f"dataset {dataset.name!r} has no brain run {brain_key!r}; compute one with "
                        "`python -m fiftyone_dinov2clip index` or fiftyone_dinov2clip.compute_similarity")
    info = dataset.get_brain_info(brain_key)
    config = info.config
    if not getattr(config, "supports_prompts", False):
        raise UserError(f"brain run {brain_key!r} was computed without a text-capable model "
                        f"(model={getattr(config, 'model', None)!r}), so it cannot take text queries: recompute "
                        f"it with fiftyone_dinov2clip.compute_similarity(dataset, brain_key={brain_key!r}, "
                        "overwrite=True) or `python -m fiftyone_dinov2clip index DATASET --overwrite`")
    return samples.sort_by_similarity(text, k=k, brain_key=brain_key)

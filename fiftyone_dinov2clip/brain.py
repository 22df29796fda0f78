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
    projected: int | None = None  # a model over a stored field: how many samples were projected from it
    recall: dict | None = None  # an approximate index's measured recall (`measured_recall`)

    def __str__(self) -> str:
        s = f"embedded {self.embedded} images, {len(self.failed)} unreadable (skipped)"
        s += f", {self.skipped_existing} already had embeddings" if self.skipped_existing else ""
        s += f", {self.projected} projected from the stored field" if self.projected is not None else ""
        if self.recall:
            s += (f"; approximate index: recall@{self.recall['k']} {self.recall['recall']:.3f} against exact search "
                  f"over {self.recall['queries']} sampled queries")
        return s


def load(model="dinov2clip-reference", **kwargs) -> DinoV2ClipModel:
    """A registered zoo model by name, or an instance as is."""
    if isinstance(model, DinoV2ClipModel):
        return model
    return foz.load_zoo_model(registry.resolve(model), **kwargs)


def _zoo_name(model) -> str | None:
    return model.config.zoo_name if isinstance(model, DinoV2ClipModel) else registry.resolve(model)


def dataset_of(samples):
    """The dataset `samples` come from (a view's `dataset_name`); FiftyOne keeps one object per dataset."""
    import fiftyone as fo

    return samples if isinstance(samples, fo.Dataset) else fo.load_dataset(samples.dataset_name)


def _schema_field(samples, path: str):
    """The field as the dataset stores it (a frames view's fields live on its video dataset's frames)."""
    dataset = dataset_of(samples)
    frames = dataset.media_type == "video" and samples.media_type != "video"
    return dataset.get_field(("frames." if frames else "") + path)


def _field_info(samples, path: str) -> dict | None:
    f = _schema_field(samples, path)
    return None if f is None else (f.info or {}).get(INFO_KEY)


def _set_field_info(samples, path: str, info: dict) -> None:
    f = _schema_field(samples, path)
    f.info = {**(f.info or {}), INFO_KEY: info}
    f.save()


def _check_distinct(embeddings_field: str, dinov2_field: str | None, brain_key: str | None = None,
                    dinov2_brain_key: str | None = None) -> None:
    """One field (or brain key) for both spaces would hold, or index, DINOv2 vectors as CLIP ones."""
    if dinov2_field and dinov2_field == embeddings_field:
        raise UserError(f"the CLIP-space and the DINOv2 embeddings need two fields, not one ({dinov2_field!r}): "
                        "pass another dinov2_field (--dinov2-field)")
    if dinov2_brain_key and dinov2_brain_key == brain_key:
        raise UserError(f"the text index and the DINOv2 index need two brain keys, not one ({brain_key!r}): "
                        "pass another dinov2_brain_key (--dinov2-brain-key)")


def _check_whole(name: str, value, optional: bool = True) -> None:
    """A count given in Python: a whole number ≥ 1 (None where `optional`); the one wording of this refusal."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name} must be a whole number, at least 1{', or None' if optional else ''}, not {value!r}")


def _check_finite(ids, vectors: np.ndarray, path: str) -> None:
    """Refuse to write a NaN or infinite embedding: every search over the field would rank it arbitrarily."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        named = [str(i) for i, b in zip(ids, bad) if b]
        raise UserError(f"{len(named)} non-finite embeddings for field {path!r} (e.g. {', '.join(named[:3])}): "
                        "nothing written for them; check the model and its inputs")


def _clip_info(core, zoo_name: str) -> dict:
    """What a CLIP-space field records of the model that wrote it (its `info["dinov2clip"]`)."""
    clip = core.config.clip
    return {"space": "clip", "model": zoo_name, "fingerprint": core.fingerprint,
            "encoder_fingerprint": core.encoder_fingerprint, "clip": f"{clip['model_name']}/{clip.get('pretrained')}"}


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


def compute_embeddings(samples, model="dinov2clip-reference", embeddings_field: str | None = DEFAULT_FIELD,
                       dinov2_field: str | None = None, batch_size: int | None = None,
                       num_workers: int | None = None, skip_existing: bool = True,
                       progress: bool | None = None) -> EmbedReport:
    """Embed every image of `samples` lacking `embeddings_field` (or `dinov2_field`), in one pass.

    An unreadable image gets no embedding and is reported in `EmbedReport.failed`; every other image
    of its batch is embedded. Works on datasets, views and frames views (`to_frames`). `embeddings_field=None`
    stores the DINOv2 embeddings alone (a model over a stored field fills it for new samples this way)."""
    if not embeddings_field and not dinov2_field:
        raise UserError("nothing to store: give embeddings_field, dinov2_field or both")
    _check_distinct(embeddings_field, dinov2_field)
    _check_whole("batch_size", batch_size)
    model = load(model)
    stored = model.core_config().dinov2.get("field")
    if stored:  # its DINOv2 section names a field, not a DINOv2 to load
        raise UserError(f"{_zoo_name(model)} projects the DINOv2 vectors stored in field {stored!r} and embeds no "
                        "image itself: use compute_similarity (or embed_from_field), which fills the field from its "
                        "producer first")
    core = model.core(image=True)
    zoo_name = _zoo_name(model)
    clip_info = _clip_info(core, zoo_name)
    dino_info = {"space": "dinov2", "model": zoo_name, "fingerprint": core.fingerprint, **core.dinov2_provenance}
    if embeddings_field:
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
            done = samples
            for f in existing:
                done = done.exists(f)
            # counted, not the difference of two counts: samples added or a database restarted between them
            # made that negative
            report.skipped_existing = len(done)
    ids, paths = todo.values(["id", "filepath"])
    batch_size = batch_size or model.config.batch_size
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers

    claimed = False
    with fou.ProgressBar(total=len(ids), progress=progress) as bar:
        for idx, pixels, failures in iter_pixel_batches(core.preprocess, paths, batch_size, workers,
                                                        core.preprocess.config.background):
            for i, reason in failures:
                logger.warning("dinov2clip: skipped unreadable image %s: %s", paths[i], reason)
                report.failed.append((paths[i], reason))
            if pixels is not None:
                emb, dino = core.encode_image(pixels, return_dinov2=True)
                batch_ids = [ids[i] for i in idx]
                if embeddings_field:
                    _check_finite([paths[i] for i in idx], emb.numpy(), embeddings_field)
                if dinov2_field:
                    _check_finite([paths[i] for i in idx], dino.numpy(), dinov2_field)
                if embeddings_field:
                    todo.set_values(embeddings_field, dict(zip(batch_ids, emb.numpy())), key_field="id")
                if dinov2_field:
                    todo.set_values(dinov2_field, dict(zip(batch_ids, dino.numpy())), key_field="id")
                if not claimed:  # provenance with the first values, so an interrupted run resumes
                    if embeddings_field:
                        _set_field_info(samples, embeddings_field, clip_info)
                    if dinov2_field:
                        _set_field_info(samples, dinov2_field, dino_info)
                    claimed = True
                report.embedded += len(idx)
            bar.update(len(idx) + len(failures))

    if embeddings_field and samples.get_field(embeddings_field) is not None:
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
    """Text-searchable similarity index over `samples`, recorded with the model's zoo name, built by
    FiftyOne's own backend (`backend`, or `default_backend`). An index it replaces is cleaned up (its LanceDB
    table dropped, etc.) once the new one exists.

    With `dinov2_field` the DINOv2 embeddings of the same pass are stored too, and with
    `dinov2_brain_key` a second, image-only index is built over them. With `patches_field` the
    objects' crops are embedded (FiftyOne's own patch pipeline, calling this model).

    Returns `(results, report)`: the text index and an `EmbedReport` (None for patches)."""
    stored = stored_field(model)
    if stored and patches_field:
        raise UserError(f"{model} projects the DINOv2 vectors stored in field {stored['field']!r} and embeds no "
                        "image itself: object patches need a model with its own DINOv2")
    if stored:
        dinov2_field = stored["field"]  # the model's input: its DINOv2 index, if any, is over that field
    if dinov2_brain_key and not dinov2_field:
        raise UserError("a DINOv2 index (dinov2_brain_key) needs the DINOv2 embeddings stored: pass dinov2_field")
    _check_distinct(embeddings_field, dinov2_field, brain_key, dinov2_brain_key)
    _check_whole("batch_size", batch_size)
    backend = backend or default_backend(len(samples))
    if isinstance(backend, str) and backend not in fob.brain_config.similarity_backends:
        raise UserError(f"unknown similarity backend {backend!r} (FiftyOne's: "
                        f"{', '.join(sorted(fob.brain_config.similarity_backends))})")
    zoo_name = registry.resolve(model) if isinstance(model, str) else model.config.zoo_name
    if zoo_name is None:
        raise UserError("pass a registered model name, not an instance: the App reloads the model by name")
    dataset = dataset_of(samples)
    keys = [k for k in (brain_key, dinov2_brain_key) if k]
    for key in keys:
        if key in dataset.list_brain_runs() and not overwrite:
            raise UserError(f"brain key {key!r} exists on dataset {dataset.name!r}: pass overwrite=True "
                            "(--overwrite) or choose another key")
    # FiftyOne does not store a LanceDB `uri` with the run: loading the runs again needs it
    credentials = {"uri": backend_kwargs["uri"]} if backend == "lancedb" and "uri" in backend_kwargs else {}
    named = any(k in backend_kwargs for k in STORAGE_NAMES)
    if named:
        # the new text index would write into the old one's named storage: the old run must go first
        for key in keys:
            if key in dataset.list_brain_runs():
                delete_run(dataset, key, **credentials)
    # New runs are built under temporary keys and replace the old ones only once all exist: a failed or
    # interrupted run leaves the old indexes as they were and no half-registered key.
    tmp = {key: f"{key}_new{secrets.token_hex(3)}" for key in keys}
    text_kwargs = {"backend": backend, **exact_search(backend, backend_kwargs), **backend_kwargs}
    if not named:
        text_kwargs.update(own_storage(dataset, brain_key, backend))
    try:
        if patches_field:
            results = fob.compute_similarity(samples, patches_field=patches_field, model=zoo_name,
                                             embeddings=embeddings_field, batch_size=batch_size or 32,
                                             num_workers=num_workers, progress=progress,
                                             brain_key=tmp[brain_key], **text_kwargs)
            report = None
        else:
            if stored:  # a model over a stored field: the field filled where missing, then projected
                report = embed_from_field(samples, zoo_name, embeddings_field, batch_size=batch_size,
                                          num_workers=num_workers, progress=progress)
            else:
                report = compute_embeddings(samples, zoo_name, embeddings_field, dinov2_field,
                                            batch_size=batch_size, num_workers=num_workers, progress=progress)
            results = fob.compute_similarity(samples, embeddings=embeddings_field, model=zoo_name,
                                             brain_key=tmp[brain_key], **text_kwargs)
            if dinov2_field and dinov2_brain_key:
                second = _second_index(backend_kwargs)
                fob.compute_similarity(samples, embeddings=dinov2_field, brain_key=tmp[dinov2_brain_key],
                                       backend=backend, **exact_search(backend, second), **second,
                                       **own_storage(dataset, dinov2_brain_key, backend))
        for key in tmp.values():
            if key in dataset.list_brain_runs():
                _check_opens(dataset, key, backend, **credentials)
    except BaseException:
        for key in tmp.values():
            if key in dataset.list_brain_runs():
                delete_run(dataset, key, **credentials)
        raise
    for key, new in tmp.items():
        if key in dataset.list_brain_runs():
            delete_run(dataset, key, **credentials)
        dataset.rename_brain_run(new, key)
    if report is not None and approximate(backend, backend_kwargs):
        report.recall = measured_recall(samples, embeddings_field, brain_key)
    return results, report  # FiftyOne's rename updates the results' key and its results cache


def own_storage(dataset, brain_key: str, backend) -> dict:
    """LanceDB arguments giving an index a table name of its own. FiftyOne would pick a name unique among
    LanceDB's `table_names()`, which lists a folder's first 10 tables: past 10, two indexes got one table. The
    random part keeps a rebuilt index from ever reusing the name of the one it replaces."""
    if backend != "lancedb":
        return {}
    return {"table_name": fou.to_slug(f"dinov2clip-{dataset.name}-{brain_key}-{secrets.token_hex(4)}")}


def _check_opens(dataset, key: str, backend, **credentials) -> None:
    """FiftyOne's LanceDB index opens its table only if `table_names()` lists it (a folder's first 10 names,
    sorted): refuse an index no process could open, rather than one that fails at its first query."""
    if backend != "lancedb":
        return
    results = dataset.load_brain_results(key, cache=False, **credentials)
    if results.table is None:
        raise UserError(f"FiftyOne's LanceDB backend finds only the first 10 tables of {results.config.uri} by "
                        f"name, and this index's table is not among them: give LanceDB a folder of its own (brain "
                        "config similarity_backends.lancedb.uri) or use backend='sklearn'")


def delete_run(dataset, key: str, **credentials) -> None:
    """Delete a brain run and what its backend stores outside FiftyOne (a LanceDB table, a Qdrant collection):
    `delete_brain_run` alone leaves those behind. sklearn stores nothing outside the run (its cleanup does
    nothing) and loading its results would read every vector, so it is not loaded. `credentials`: what the
    backend's results load with besides FiftyOne's brain config (a LanceDB `uri` given to compute_similarity)."""
    method = getattr(dataset.get_brain_info(key).config, "method", None)
    if method != "sklearn":
        try:
            results = dataset.load_brain_results(key, cache=False, **credentials)
            results.cleanup()
            if method == "lancedb":  # cleanup() drops only the tables table_names() lists: its first 10
                import lancedb

                db = lancedb.connect(results.config.uri)
                for table in (results.config.table_name, results.config.table_name + "_filter"):
                    db.drop_table(table, ignore_missing=True)
        except Exception as e:  # the run still goes: its storage may already be gone
            logger.warning("dinov2clip: could not clean up brain run %r's %s index: %s", key, method, e)
    dataset.delete_brain_run(key)


# fiftyone-brain 0.27 gives a LanceDB table an approximate (IVF) vector index from `min_index_rows` (2,048) rows
# by default. dinov2clip's indexes stay exact unless the caller asks for an index (`index_type` or
# `min_index_rows`, LanceDBSimilarityConfig's documented arguments): then `measured_recall` reports what it costs.
ANN_OPTIONS = ("index_type", "min_index_rows")
NEVER = 2**62


def _brain_version() -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(p) for p in version("fiftyone-brain").split(".")[:2] if p.isdigit())


def exact_search(backend, backend_kwargs: dict) -> dict:
    """What keeps a default index exact on the installed fiftyone-brain (nothing where it is exact already)."""
    if backend != "lancedb" or _brain_version() < (0, 27) or any(k in backend_kwargs for k in ANN_OPTIONS):
        return {}
    return {"min_index_rows": NEVER}


def approximate(backend, backend_kwargs: dict) -> bool:
    return backend == "lancedb" and _brain_version() >= (0, 27) and \
        backend_kwargs.get("min_index_rows", 0) < NEVER and any(k in backend_kwargs for k in ANN_OPTIONS)


def measured_recall(samples, embeddings_field: str, brain_key: str, k: int = 25, queries: int = 50) -> dict:
    """recall@k of the index under `brain_key` against an exact cosine ranking of the stored embeddings, for
    `queries` stored vectors taken evenly through the collection (the index answers as FiftyOne's sort does)."""
    ids, vectors = samples.values(["id", embeddings_field])
    keep = [i for i, v in enumerate(vectors) if v is not None]
    ids, matrix = [ids[i] for i in keep], np.stack([vectors[i] for i in keep]).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    k = min(k, len(ids))
    hits = 0
    picks = np.linspace(0, len(ids) - 1, min(queries, len(ids))).astype(int)
    for i in picks:
        exact = {ids[j] for j in np.argsort(-(matrix @ matrix[i]), kind="stable")[:k]}
        got = samples.sort_by_similarity(matrix[i], k=k, brain_key=brain_key).values("id")
        hits += len(exact & set(got))
    return {"k": k, "queries": len(picks), "recall": hits / (k * len(picks))}


def default_backend(n_samples: int) -> str:
    """The backend of an index built with none named, one of FiftyOne's own (dinov2clip keeps no vectors of its
    own: docs/fiftyone-indexes.md): FiftyOne's configured default if the user changed it; else sklearn, or
    lancedb from LANCEDB_FROM."""
    configured = fob.brain_config.default_similarity_backend
    if configured != "sklearn" or n_samples < LANCEDB_FROM:
        return configured
    if importlib.util.find_spec("lancedb") is None:
        logger.warning("dinov2clip: %d samples: with lancedb installed (pip install lancedb) the index would be "
                       "LanceDB's and the App's first text query would not read every vector from MongoDB; "
                       "using sklearn", n_samples)
        return configured
    return "lancedb"


def project_field(samples, dinov2_field: str, model="dinov2clip-reference",
                  embeddings_field: str = DEFAULT_FIELD, provenance: dict | None = None,
                  batch_size: int = 4096) -> int:
    """Project DINOv2 embeddings already stored in `dinov2_field` into CLIP space, without the images.

    The field must say what it holds (written by `compute_embeddings(dinov2_field=...)`, or declared
    with `provenance={"source": ..., "pooling": ...}`) and match the projector's input; a mismatch is
    refused with the reason. A model fitted on a stored field (`fit --from-field`) projects only vectors of the
    producer it was fitted on. Returns how many embeddings were written."""
    model = load(model)
    core = model.core()
    want = core.dinov2_provenance
    have = provenance or _field_info(samples, dinov2_field)
    stored = core.config.dinov2 if core.config.dinov2.get("field") else None
    if stored:
        _check_producer(dinov2_field, stored["producer"], have, _zoo_name(model))
    elif have is None:
        raise UserError(
            f"field {dinov2_field!r} does not say which DINOv2 and pooling produced it (FiftyOne's own "
            f"DINOv2 zoo models store CLS tokens; this projector takes {want['pooling']}-pooled "
            f"{want['source']} tokens): recompute it with compute_embeddings(dinov2_field=...), or pass "
            "provenance={'source': ..., 'pooling': ...} if you know it")
    if not stored and have.get("encoder_fingerprint") not in (None, want["encoder_fingerprint"]):
        raise UserError(f"field {dinov2_field!r} holds embeddings of encoders {have['encoder_fingerprint'][:12]}; "
                        f"{_zoo_name(model)} projects those of {want['encoder_fingerprint'][:12]}: recompute the "
                        "field with this model")
    for key in ("source", "pooling") if not stored else ():
        if have.get(key) != want[key]:
            raise UserError(f"field {dinov2_field!r} holds {have.get('pooling')}-pooled {have.get('source')} "
                            f"embeddings; {_zoo_name(model)} projects {want['pooling']}-pooled {want['source']} "
                            "embeddings: recompute the field with this model")
    view = samples.exists(dinov2_field)
    ids, values = view.values(["id", dinov2_field])
    info = _clip_info(core, _zoo_name(model))
    _check_field(samples, embeddings_field, info)
    if ids:  # before any write: a non-finite input projects to a non-finite embedding
        _check_finite(ids, np.stack([np.asarray(v, np.float32).ravel() for v in values]), dinov2_field)
    for start in range(0, len(ids), batch_size):
        x = np.stack(values[start:start + batch_size]).astype(np.float32)
        emb = core.project(x).cpu().numpy()
        _check_finite(ids[start:start + batch_size], emb, embeddings_field)
        view.set_values(embeddings_field, dict(zip(ids[start:start + batch_size], emb)), key_field="id")
    if ids:
        _set_field_info(samples, embeddings_field, info)
    return len(ids)


# -- models over a stored DINOv2 field (`training.run fit --from-field`) ----------------------------------------

def stored_field(model) -> dict | None:
    """The DINOv2 section of a model whose input is a stored field (field, producer, hidden_size), else None.
    Read from its config: no weights are loaded."""
    section = load(model).core_config().dinov2
    return section if section.get("field") else None


def _producer_info(producer: dict) -> dict:
    """What a field filled by a FiftyOne zoo model records, so a later fit or index knows its producer."""
    return {"space": "dinov2", "model": producer["model"], "producer": producer}


def _check_producer(path: str, producer: dict, have: dict | None, model_name: str) -> None:
    """A model over a stored field projects only vectors of the model that wrote its training field."""
    if producer["kind"] == "dinov2clip":
        got = (have or {}).get("encoder_fingerprint") or ((have or {}).get("producer") or {}).get("encoder_fingerprint")
        if got != producer.get("encoder_fingerprint"):
            raise UserError(f"field {path!r} was not written by {producer['model']} (encoders "
                            f"{str(producer.get('encoder_fingerprint'))[:12]}), whose vectors {model_name} projects: "
                            "use the field it was fitted on, or fit it on this one")
        return
    if have is not None and have.get("producer") != producer:
        raise UserError(f"field {path!r} records that {have.get('model')} wrote it; {model_name} projects vectors "
                        f"of {producer['model']}: use the field it was fitted on, or fit it on this one")


def fill_field(samples, stored: dict, batch_size: int | None = None, num_workers: int | None = None,
               progress: bool | None = None) -> EmbedReport:
    """Give the samples that lack the stored field a value from its producer, opening only their images: our own
    zoo model (its DINOv2 alone) or the FiftyOne zoo model the field was fitted as written by."""
    from fiftyone import ViewField as F

    path, producer = stored["field"], stored["producer"]
    exists = samples.get_field(path) is not None
    todo = samples.match(F(path) == None) if exists else samples  # noqa: E711 (a MongoDB expression)
    report = EmbedReport(skipped_existing=len(samples.exists(path)) if exists else 0)
    if not len(todo):
        return report
    if exists:  # a field another model wrote since the fit: its vectors would be projected as the producer's
        _check_producer(path, producer, _field_info(samples, path), "this model")
    if producer["kind"] == "dinov2clip":
        filled = compute_embeddings(todo, producer["model"], embeddings_field=None, dinov2_field=path,
                                    batch_size=batch_size, num_workers=num_workers, skip_existing=False,
                                    progress=progress)
        report.embedded, report.failed = filled.embedded, filled.failed
        return report
    ids, paths = todo.values(["id", "filepath"])
    todo.compute_embeddings(foz.load_zoo_model(producer["model"]), embeddings_field=path, batch_size=batch_size,
                            num_workers=num_workers, skip_failures=True, progress=progress)
    _set_field_info(samples, path, _producer_info(producer))
    done = set(samples.select(ids).exists(path).values("id"))
    report.embedded = len(done)
    report.failed = [(p, f"{producer['model']} could not embed it") for i, p in zip(ids, paths) if i not in done]
    return report


def embed_from_field(samples, model, embeddings_field: str = DEFAULT_FIELD, batch_size: int | None = None,
                     num_workers: int | None = None, progress: bool | None = None) -> EmbedReport:
    """A model over a stored field: samples lacking the field get it from its producer, then every sample is
    projected from the field (no other image is opened)."""
    stored = stored_field(model)
    if stored is None:
        raise UserError(f"{model} embeds images itself: use compute_embeddings")
    report = fill_field(samples, stored, batch_size=batch_size, num_workers=num_workers, progress=progress)
    report.projected = project_field(samples, stored["field"], model, embeddings_field)
    return report


# Backend options that name one index's own storage: the text index keeps the user's; the DINOv2 index gets
# its own (`own_storage` for LanceDB, else the backend's default name), so the two never write into one table.
STORAGE_NAMES = ("table_name", "collection_name", "index_name", "namespace")


def _second_index(backend_kwargs: dict) -> dict:
    return {k: v for k, v in backend_kwargs.items() if k not in STORAGE_NAMES}


def sort_by_text(samples, text: str, brain_key: str = DEFAULT_BRAIN_KEY, k: int | None = None,
                 record: dict | None = None):
    """`samples.sort_by_similarity(text)` with a clear error when the run cannot take text, or the text gives
    no direction to rank by (a NaN or zero query vector ranks arbitrarily). `record` (a dict) receives
    `query_chars`, the characters of `text` the model read, and `query_cut`, whether that is fewer than all."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"a text query must be a non-empty string, not {text!r}")
    _check_whole("k", k)
    dataset = dataset_of(samples)
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
    # Encoded here (the model refuses a text with no direction), then searched as a vector: a text that looks
    # like a sample id is still a text (FiftyOne takes such a string for an id).
    model = dataset.load_brain_results(brain_key).get_model()
    query = np.asarray(model.embed_prompt(text), np.float32)
    if record is not None:
        limit = getattr(model, "text_limit", len(text))
        record.update(query_chars=min(len(text), limit), query_cut=len(text) > limit)
    return samples.sort_by_similarity(query, k=k, brain_key=brain_key)


# -- why did this match? heatmaps for a text query's top hits ---------------------------------------------------
HEATMAP_FIELD = "dinov2clip_heatmap"
# The longest side a stored map keeps: FiftyOne stores a map inline in the sample's document (at most 16 MB in
# MongoDB) and the App reads it with every page of the grid; the App stretches a map over its image.
HEATMAP_MAX_SIDE = 1024


@dataclass
class ExplainReport:
    hits: list = field(default_factory=list)  # the top k's sample ids, best first
    view: object = field(default=None, repr=False)  # those k, sorted by the text (a view, as sort_by_text's)
    explained: list = field(default_factory=list)  # those given a heatmap, best first
    failed: list = field(default_factory=list)  # (filepath, reason): unreadable images, no label written
    query_cut: bool = False  # the text tower read fewer characters than the query holds

    @property
    def written(self) -> int:
        return len(self.explained)

    def __str__(self) -> str:
        s = f"wrote {self.written} heatmaps, {len(self.failed)} unreadable images (no heatmap)"
        return s + ("; the query was cut to what the text tower reads" if self.query_cut else "")


def _check_heatmap_field(samples, path: str) -> None:
    """Write heatmaps only into a new field or one dinov2clip filled with heatmaps before."""
    import fiftyone as fo

    if not isinstance(path, str) or not path or path.startswith("_") or "." in path:
        raise UserError(f"label field {path!r}: give a top-level field name, such as {HEATMAP_FIELD!r}")
    f = samples.get_field(path)
    if f is None:
        return
    ours = (_field_info(samples, path) or {}).get("kind") == "heatmap"
    if getattr(f, "document_type", None) is not fo.Heatmap or not ours:
        raise UserError(f"field {path!r} exists and does not hold dinov2clip heatmaps: choose another label_field")


def explain(samples, text: str, k: int = 25, brain_key: str = DEFAULT_BRAIN_KEY, label_field: str = HEATMAP_FIELD,
            method: str | None = None, max_side: int | None = HEATMAP_MAX_SIDE) -> ExplainReport:
    """Why the top `k` matches of `text` in `samples` match it: `fo.Heatmap` labels in `label_field`, one per hit,
    each a float32 map in its image's coordinates (range [0, 1]; longest side at most `max_side`), with the
    `query`, `model` and `method` that made it. Only those k images are opened; other samples are not touched.
    An unreadable image gets no label and is listed in the report."""
    from dinov2clip.heatmap import DEFAULT_METHOD

    import fiftyone as fo

    _check_whole("k", k, optional=False)
    _check_whole("max_side", max_side)
    _check_heatmap_field(samples, label_field)
    record = {}
    hits = sort_by_text(samples, text, brain_key, k, record=record)
    model = dataset_of(samples).load_brain_results(brain_key).get_model()  # sort_by_text's, cached with the run
    if not isinstance(model, DinoV2ClipModel):
        raise UserError(f"brain run {brain_key!r} was computed with {type(model).__name__}, not a dinov2clip model: "
                        "heatmaps need a dinov2clip model's patches and projector")
    method = method or DEFAULT_METHOD
    core = model.core(image=True, text=True)
    name = _zoo_name(model)
    ids, paths = hits.values(["id", "filepath"])
    report = ExplainReport(hits=list(ids), view=hits, query_cut=record["query_cut"])
    maps = core.heatmap(paths, text, method=method, max_side=max_side,
                        on_error=lambda i, reason: report.failed.append((paths[i], reason)))
    labels = {i: fo.Heatmap(map=np.ascontiguousarray(m, np.float32), range=[0, 1], query=text, model=name,
                            method=method) for i, m in zip(ids, maps) if m is not None}
    for path, reason in report.failed:
        logger.warning("dinov2clip: no heatmap for unreadable image %s: %s", path, reason)
    if labels:
        hits.set_values(label_field, labels, key_field="id")
        _set_field_info(samples, label_field, {"kind": "heatmap"})
    report.explained = list(labels)
    return report

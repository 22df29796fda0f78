"""`fit` and `quality` over a FiftyOne dataset or saved view: its image files go to `training.fit` (the same
encode path, feature cache and training as folders), its Classification labels to the quality report."""
from __future__ import annotations

from dinov2clip.errors import UserError


def samples_of(dataset: str, view: str | None = None):
    """A dataset, or one of its saved views, by name."""
    import fiftyone as fo

    if dataset not in fo.list_datasets():
        raise UserError(f"no FiftyOne dataset named {dataset!r}")
    samples = fo.load_dataset(dataset)
    if view is not None:
        if not samples.has_saved_view(view):
            raise UserError(f"dataset {dataset!r} has no saved view {view!r}")
        samples = samples.load_saved_view(view)
    if samples.media_type != "image":
        raise UserError(f"dataset {dataset!r} holds {samples.media_type} samples; fit and quality read images")
    return samples


def image_paths(samples) -> list[str]:
    return [p for p in samples.values("filepath") if p]


def labels_of(samples, field: str) -> dict[str, str | None]:
    """filepath → the class of a Classification field (None where a sample has none)."""
    import fiftyone as fo

    schema = samples.get_field_schema(flat=True)
    if field not in schema:
        raise UserError(f"the samples have no field {field!r}")
    kind = getattr(schema[field], "document_type", None)
    if kind is not fo.Classification:
        raise UserError(f"field {field!r} is not a Classification field: zero-shot needs one class per image")
    return dict(zip(samples.values("filepath"), samples.values(f"{field}.label")))


# -- --from-field: a stored DINOv2 field as the projector's input ------------------------------------------------

# The width of FiftyOne's own DINOv2 zoo models' embeddings (their CLS token): a field they wrote must have it.
FIFTYONE_DINOV2_WIDTHS = {f"dinov2-vit{size}14{reg}-torch": width for size, width in
                          (("s", 384), ("b", 768), ("l", 1024), ("g", 1536)) for reg in ("", "-reg")}


def field_vectors(samples, field: str) -> tuple[list[str], list[str], list]:
    """(ids, filepaths, values) of every sample; a value is None where the sample lacks the field."""
    schema = samples.get_field_schema(flat=True)
    if field not in schema:
        raise UserError(f"the samples have no field {field!r}")
    ids, paths, values = samples.values(["id", "filepath", field])
    return ids, paths, values


def producer_of(samples, field: str, named: str | None) -> dict:
    """Which model wrote `field`: what the field records (our `compute_embeddings`, or an earlier index that
    filled it from a FiftyOne zoo model), else the FiftyOne zoo model the user names; refused in one line when
    neither says, or when they disagree."""
    from .brain import _field_info

    info = _field_info(samples, field)
    if info is not None and info.get("space") != "dinov2":
        raise UserError(f"field {field!r} holds {info.get('space')}-space embeddings of {info.get('model')}, "
                        "not DINOv2 ones: name the field that holds the DINOv2 embeddings")
    if info is not None and info.get("producer"):
        recorded = dict(info["producer"])  # a plain dict: MongoDB's document dict does not serialise
    elif info is not None:
        recorded = {"kind": "dinov2clip", "model": info.get("model"), "source": info.get("source"),
                    "pooling": info.get("pooling"), "encoder_fingerprint": info.get("encoder_fingerprint")}
    else:
        recorded = None
    if recorded is not None:
        if named and named not in (recorded.get("model"), str(recorded.get("model")).partition("@")[0]):
            raise UserError(f"field {field!r} records that {recorded.get('model')} wrote it, not {named}: drop "
                            "--producer, or name the model that did")
        return recorded
    if not named:
        raise UserError(f"field {field!r} does not say which model wrote it: pass --producer ZOO_MODEL (e.g. "
                        "dinov2-vitb14-torch, the FiftyOne zoo model that embeds new samples the same way)")
    return {"kind": "fiftyone-zoo", "model": zoo_model_name(named)}


def zoo_model_name(name: str) -> str:
    """A FiftyOne zoo model that exists (its manifest entry; nothing downloaded) and writes DINOv2 vectors."""
    import fiftyone.zoo as foz

    from . import registry

    base = name.partition("@")[0]
    if base in {m.partition("@")[0] for m in registry.registered()}:
        raise UserError(f"--producer {name}: a dinov2clip model stores CLIP-space embeddings through FiftyOne; "
                        "write its DINOv2 field with fiftyone_dinov2clip.compute_embeddings(dinov2_field=...)")
    try:
        return foz.get_zoo_model(name).name
    except Exception:  # FiftyOne's own error for an unknown name is a ValueError with a long listing
        raise UserError(f"--producer {name}: no FiftyOne zoo model of that name (see "
                        "fiftyone.zoo.list_zoo_models())") from None


def producer_width(producer: dict) -> int | None:
    """The width of the vectors the producer writes, where known (None: every stored vector must just agree)."""
    if producer["kind"] == "fiftyone-zoo":
        return FIFTYONE_DINOV2_WIDTHS.get(producer["model"].partition("@")[0])
    from dinov2clip.dinov2 import pooled_dim
    from dinov2clip.factory import resolve_source

    from . import registry

    try:  # our own zoo model's config names its DINOv2 width (a preset's may not until it is loaded)
        config, _ = resolve_source(registry.spec(producer["model"])["source"])
    except (UserError, OSError, KeyError):
        return None
    hidden = config.dinov2.get("hidden_size")
    return pooled_dim(int(hidden), producer["pooling"]) if hidden and producer.get("pooling") else None

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

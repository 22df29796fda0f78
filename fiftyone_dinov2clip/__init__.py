"""FiftyOne front-end of dinov2clip: zoo models by name, similarity indexes with text search, plugin.

    python -m fiftyone_dinov2clip register-presets          # zoo names for every preset
    python -m fiftyone_dinov2clip register my-model ./dir   # a model directory or hf-hub:org/repo

    import fiftyone_dinov2clip as fod
    fod.compute_similarity(dataset, "my-model", brain_key="dinov2clip", dinov2_field="dinov2")
    dataset.sort_by_similarity("a dog on a beach", brain_key="dinov2clip")
    fod.explain(dataset, "a dog on a beach", k=25)          # heatmaps: why the top 25 match

Importing this package does not import fiftyone or torch; the functions below do, on first use."""
from .registry import register, register_presets, registered, resolve, unregister

_LAZY = {
    "compute_embeddings": "brain", "compute_similarity": "brain", "project_field": "brain",
    "sort_by_text": "brain", "explain": "brain", "load": "brain", "EmbedReport": "brain", "ExplainReport": "brain",
    "DinoV2ClipModel": "zoo", "DinoV2ClipModelConfig": "zoo",
    "download_model": "zoo_source", "load_model": "zoo_source",
}

__all__ = ["register", "register_presets", "registered", "resolve", "unregister", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""dinov2clip zoo models; written by fiftyone_dinov2clip (do not edit)."""
from fiftyone_dinov2clip.zoo_source import download_model, load_model  # noqa: F401

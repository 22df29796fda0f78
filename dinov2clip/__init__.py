"""dinov2clip: text search over DINOv2 image embeddings, through a projector into CLIP space.

Public names load on first use (PEP 562): `import dinov2clip` stays cheap for processes that only need
its light modules (errors, presets) — FiftyOne listing plugins, clip-retrieval's start-up hook."""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "config", "ImageError": "errors", "UserError": "errors",
    "from_parts": "factory", "load": "factory", "load_encoders": "factory", "Encoders": "model", "DinoV2Clip": "model", "bundle": "modeldir",
    "convert_reference": "modeldir", "make_tiny": "modeldir", "DEFAULT_PRESET": "presets", "PRESETS": "presets",
    "list_presets": "presets", "Preprocess": "preprocess", "PreprocessConfig": "preprocess",
    "load_rgb": "preprocess", "ProjectorWithResiduals": "projector", "load_projector": "projector",
}

_SUBMODULES = {"atomic", "cli", "formats", "clip_text", "config", "dinov2", "embed", "errors", "factory", "hub", "identity", "model", "modeldir",
               "presets", "preprocess", "projector", "sources"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:  # `dinov2clip.factory.build` after a plain `import dinov2clip`
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

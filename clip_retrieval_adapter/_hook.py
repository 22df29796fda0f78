"""Start-up hook: register with all_clip when (and only if) `all_clip.main` is imported.

Imported from a .pth file in every Python process, so it must stay tiny: no torch, no dinov2clip."""
import sys

TARGET = "all_clip.main"
PREFIX = "dinov2clip"


def _lazy_loader(clip_model, use_jit=True, device="cpu", clip_cache_path=None):
    from .loader import load_dinov2clip

    return load_dinov2clip(clip_model, use_jit, device, clip_cache_path)


def add_to_registry(module) -> None:
    registry = getattr(module, "_CLIP_REGISTRY", None)
    if not isinstance(registry, dict) or PREFIX in registry:
        return
    catch_all = registry.pop("", None)  # prefixes match in order: "" must stay last
    registry[PREFIX] = _lazy_loader
    if catch_all is not None:
        registry[""] = catch_all


class _Finder:
    """A meta-path finder that only watches for `all_clip.main` and wraps its loader."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            add_to_registry(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if TARGET in sys.modules:
        add_to_registry(sys.modules[TARGET])
    elif not any(f is _Finder for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder)

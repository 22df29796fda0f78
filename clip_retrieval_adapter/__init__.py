"""Makes the stock `clip-retrieval` CLI accept `--clip_model dinov2clip[:SOURCE]`.

clip-retrieval has no plugin API: every model goes through `all_clip.main._CLIP_REGISTRY`
(prefix → loader, ending in a catch-all "" that must stay last). The `dinov2clip_clip_retrieval.pth`
file this distribution installs runs `_hook.install()` at interpreter start-up, so every process
clip-retrieval starts (Spark executors, `back` workers) registers us the moment it imports
`all_clip.main` — without importing torch or anything else until then.

Call `register()` yourself if you prefer not to rely on the .pth hook.
"""
from ._hook import PREFIX  # noqa: F401  (one definition; _hook stays import-light)


def register() -> None:
    """Register the `dinov2clip` prefix with all_clip now (idempotent)."""
    import all_clip.main

    from ._hook import add_to_registry

    add_to_registry(all_clip.main)

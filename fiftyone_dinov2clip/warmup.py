"""Import torch, open_clip and lancedb early in FiftyOne's App server, while the page loads.

The imports are most of a first text query's wait in a fresh App server (~4 s of ~5 s here; lancedb's own
0.7 s more). FiftyOne registers plugins when the App first lists operators (page load); from then, one
background thread imports them. Two threads importing torch/torchvision at once can trip Python's import
deadlock detection (seen here: `_DeadlockError` on torchvision.ops.misc in the query's thread), so the query
path never imports beside it: `zoo` (imported before anything of ours imports torch) waits until this thread
has imported torch, `lancedb_index` (imported before FiftyOne's LanceDB backend imports lancedb) until it
has also imported lancedb, last (the modules lancedb brings, pyarrow and pydantic among them, are none a
query on a sklearn index imports, so that query may run beside it).

Light: imports neither fiftyone nor torch."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

_thread: threading.Thread | None = None
_torch_ready = threading.Event()
_lock = threading.Lock()


def in_app_server() -> bool:
    """True in FiftyOne's App server (`fiftyone app launch`, `fo.launch_app()`, `python -m fiftyone.server.main`)."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    path = Path(getattr(__main__, "__file__", "") or "").as_posix()
    return (spec is not None and spec.name == "fiftyone.server.main") or path.endswith("fiftyone/server/main.py")


def _imports() -> None:
    import importlib.util

    try:
        import open_clip  # noqa: F401  (imports torch and torchvision)

        import dinov2clip.factory  # noqa: F401
        import fiftyone.utils.torch  # noqa: F401
    except Exception as e:  # the query reports any real problem, with its context
        logger.debug("dinov2clip warm-up: %s", e)
    finally:
        _torch_ready.set()  # a query on a sklearn index need not wait for lancedb's import
    try:
        if importlib.util.find_spec("lancedb") is not None:  # the default index from 30k samples: 0.7 s here
            import lancedb  # noqa: F401
    except Exception as e:
        logger.debug("dinov2clip warm-up: %s", e)


def start() -> None:
    """In the App server only, and once per process (`DINOV2CLIP_NO_WARMUP=1`: never)."""
    global _thread
    if os.environ.get("DINOV2CLIP_NO_WARMUP") == "1" or not in_app_server():
        return
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_imports, name="dinov2clip-warm-up", daemon=True)
            _thread.start()


def wait(lancedb: bool = False) -> None:
    """Block until the warm-up has imported torch and open_clip (`lancedb`: and lancedb, its last import); at
    once when there is no warm-up."""
    thread = _thread
    if thread is None or thread is threading.current_thread():
        return
    if lancedb:
        thread.join()
    else:
        _torch_ready.wait()

"""How soon the App's Similarity Search panel learns that a text query's run finished.

The panel lists its runs again when FiftyOne's execution-store notification service tells it the store
changed. That service follows MongoDB change streams where it can; FiftyOne's own mongod runs standalone,
which has none, so it polls the store every `FIFTYONE_EXECUTION_STORE_POLL_INTERVAL_SECONDS` (5 by default,
whole seconds only). On screen that wait, not the search, was most of a text query's time (a search
takes 0.1–0.3 s at 100k samples here). In the App server, dinov2clip's plugin polls every `POLL_S`
instead, unless the user set FiftyOne's variable (theirs wins; FiftyOne read it at import). A poll is three
small queries on the execution store (`bench_app.py` prints the idle server's CPU).

Light: imports neither fiftyone nor torch at import; `apply()` imports FiftyOne's notification module, which
the App server has imported already."""
from __future__ import annotations

import logging
import os

from .warmup import in_app_server

logger = logging.getLogger(__name__)

FIFTYONE_SETTING = "FIFTYONE_EXECUTION_STORE_POLL_INTERVAL_SECONDS"
PLUGIN_NAME = "@dinov2clip/dinov2clip"  # fiftyone.yml's name: the plugin that calls apply()
POLL_S = 0.25


def apply() -> float | None:
    """In the App server, poll every POLL_S unless FiftyOne's variable is set; returns the interval now in
    force there (None outside the App server). FiftyOne's loop reads the module's interval before each sleep,
    so this takes effect from the next poll."""
    if not in_app_server():
        return None
    from fiftyone.operators.store import notification_service

    if os.environ.get(FIFTYONE_SETTING) is None and notification_service.POLL_INTERVAL_SECONDS > POLL_S:
        notification_service.POLL_INTERVAL_SECONDS = POLL_S
        logger.debug("dinov2clip: the execution store is polled every %s s", POLL_S)
    return notification_service.POLL_INTERVAL_SECONDS


def before_app_launch() -> None:
    """Before this process starts an App server (`quickstart`): where our plugin is not enabled to shorten
    the poll, ask FiftyOne for its shortest whole-second one, unless the user set it. FiftyOne's App server
    reads the variable when it starts."""
    import fiftyone.plugins as fop

    if PLUGIN_NAME not in fop.list_enabled_plugins():
        os.environ.setdefault(FIFTYONE_SETTING, "1")

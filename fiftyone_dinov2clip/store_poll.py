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

import asyncio
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
    but one sleep of the old interval is usually under way (plugins register on the first page load, the loop
    started with the server), and a run finishing within it would wait up to 5 s more (seen in CI): so that
    sleep is bridged (`_bridge`)."""
    if not in_app_server():
        return None
    from fiftyone.operators.store import notification_service

    old = notification_service.POLL_INTERVAL_SECONDS
    if os.environ.get(FIFTYONE_SETTING) is None and old > POLL_S:
        notification_service.POLL_INTERVAL_SECONDS = POLL_S
        service = notification_service.default_notification_service
        loop = service.dedicated_event_loop
        # Polling has started (the change-stream mode never sets _last_poll_time): bridge its sleep
        if loop is not None and loop.is_running() and service._last_poll_time is not None:
            asyncio.run_coroutine_threadsafe(_bridge(service, old), loop)
        logger.debug("dinov2clip: the execution store is polled every %s s", POLL_S)
    return notification_service.POLL_INTERVAL_SECONDS


async def _bridge(service, seconds: float) -> None:
    """On the notification service's own loop: poll every POLL_S for `seconds`, until FiftyOne's sleep of the
    old interval is surely over and its loop polls every POLL_S itself. Polls go one at a time (FiftyOne's
    loop calls `self._poll`, which now takes a lock), so two never interleave their reads of the store."""
    lock = asyncio.Lock()
    poll = service._poll

    async def one_at_a_time():
        async with lock:
            await poll()

    service._poll = one_at_a_time
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end and not (service._stop_event and service._stop_event.is_set()):
        await asyncio.sleep(POLL_S)
        try:
            await service._poll()
        except Exception as e:  # FiftyOne's loop goes on polling and logs its own errors
            logger.debug("dinov2clip: bridging poll: %s", e)


def before_app_launch() -> None:
    """Before this process starts an App server (`quickstart`): where our plugin is not enabled to shorten
    the poll, ask FiftyOne for its shortest whole-second one, unless the user set it. FiftyOne's App server
    reads the variable when it starts."""
    import fiftyone.plugins as fop

    if PLUGIN_NAME not in fop.list_enabled_plugins():
        os.environ.setdefault(FIFTYONE_SETTING, "1")

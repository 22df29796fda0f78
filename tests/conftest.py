"""Shared fixtures. The environment is fixed before anything imports huggingface_hub/transformers:
no hub access (a hub call would otherwise hang for minutes), private caches per test session."""
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
_SESSION_HOME = tempfile.mkdtemp(prefix="dinov2clip-tests-")
os.environ["HF_HOME"] = os.path.join(_SESSION_HOME, "hf")
os.environ["HF_HUB_CACHE"] = os.path.join(_SESSION_HOME, "hf", "hub")
os.environ["DINOV2CLIP_CACHE"] = os.path.join(_SESSION_HOME, "dinov2clip")
os.environ["DINOV2CLIP_LOG_DIR"] = os.path.join(_SESSION_HOME, "logs")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    import dinov2clip

    return dinov2clip.make_tiny(str(tmp_path_factory.mktemp("models") / "tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    import dinov2clip

    return dinov2clip.load(str(tiny_dir), device="cpu", dtype="fp32")


def solid(color, size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


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


def seed_hub_repo(repo_id: str, files: dict[str, Path]) -> None:
    """Lay files out exactly as huggingface_hub's cache does (refs/main → snapshot), so the real
    download code resolves them with HF_HUB_OFFLINE=1. A directory value is copied as a tree."""
    root = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        if Path(src).is_dir():
            shutil.copytree(src, snapshot / name, dirs_exist_ok=True)
        else:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, snapshot / name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)

"""Helpers the test modules import (`from testsupport import ...`). They live here, not in conftest.py:
tests/ and tests/fo/ each have a conftest.py, so `from conftest import` would find whichever pytest
imported last."""
import os
import shutil
from pathlib import Path

from PIL import Image

DATA = Path(__file__).parent / "data"


def solid(color, size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


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

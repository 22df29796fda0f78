"""The offline demo, made wherever it runs (an installed wheel, no checkout, no network): the six example
images and the tiny model trained on their kind of picture.

    python -m fiftyone_dinov2clip quickstart --demo       # ./dinov2clip-demo, then the FiftyOne App
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from dinov2clip.atomic import atomic_path
from dinov2clip.errors import UserError

# The repository's examples/images: one shape per colour, seed 1, 96 px (a test checks they match).
EXAMPLES = [("red", "circle"), ("green", "square"), ("blue", "triangle"),
            ("yellow", "circle"), ("purple", "square"), ("white", "triangle")]
DEMO_DIR = Path("dinov2clip-demo")
DEMO_QUERY = "a red circle"


def write_examples(folder: Path) -> Path:
    """Draw the example images into `folder`; images already there are kept as they are."""
    from .synthetic import shape_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for colour, shape in EXAMPLES:
        image = shape_image(rng, colour, shape, 96)  # drawn even when kept: the next ones depend on the draw
        path = folder / f"{colour}_{shape}.png"
        if not path.exists():
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
    return folder


def prepare_demo(out: Path = DEMO_DIR, progress: bool = True) -> tuple[Path, str]:
    """(images folder, model directory) under `out`: the examples, and the `tiny` config's model trained
    from nothing (a rerun finds both made and does nothing)."""
    missing = [m for m in ("yaml", "braceexpand") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"the demo trains a tiny model, which needs the [train] extra (no {', '.join(missing)}): "
                        "pip install 'dinov2clip[train]'")
    from .pipeline import load_config, run_pipeline

    out = Path(out).absolute()
    images = write_examples(out / "images")
    summary = run_pipeline(load_config("tiny"), out / "tiny", progress=progress)
    return images, summary["model"]

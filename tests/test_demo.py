"""The demo an installed wheel runs (`quickstart --demo`) draws the repository's examples/images."""
from pathlib import Path

import numpy as np
from PIL import Image

from training.demo import write_examples

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


def test_demo_draws_the_example_images(tmp_path):
    made = write_examples(tmp_path / "images")
    shipped = sorted(p.name for p in EXAMPLES.glob("*.png"))
    assert sorted(p.name for p in made.iterdir()) == shipped and len(shipped) == 6
    for name in shipped:
        assert np.array_equal(np.asarray(Image.open(made / name)), np.asarray(Image.open(EXAMPLES / name))), name


def test_demo_keeps_images_already_there(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "red_circle.png").write_bytes(b"not ours to replace")
    write_examples(folder)
    assert (folder / "red_circle.png").read_bytes() == b"not ours to replace"
    assert len(list(folder.glob("*.png"))) == 6

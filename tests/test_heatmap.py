"""Text heatmaps: the core API (geometry, batching, bad input) and the `explain` / `search --explain` commands."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinov2clip
from dinov2clip.errors import UserError
from dinov2clip.heatmap import DEFAULT_METHOD, METHODS, is_overlay, neighbourhoods, patch_grid_to_image

EXE = Path(sys.executable).with_name("dinov2clip")


def run(*args):
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, timeout=300)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("dinov2clip:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def picture(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(160, 100), (100, 160), (300, 300), (37, 23)])
def test_the_patch_grid_lands_where_preprocessing_took_it_from(tiny_model, size):
    """A marker pixel is found in the crop the model sees; a map that is 1 at that patch only peaks on the marker,
    in the image's own coordinates, and is 0 outside the crop."""
    w, h = size
    patch = tiny_model.image_encoder.patch_size
    new_w, new_h, left, top = tiny_model.preprocess.geometry(size)
    x, y = int((left + 100 + 7) * w / new_w), int((top + 60 + 7) * h / new_h)  # a pixel near crop (107, 67)
    marked = Image.new("RGB", size)
    marked.putpixel((x, y), (255, 255, 255))
    crop = np.asarray(tiny_model.preprocess.resize_crop(marked)).sum(-1)
    cy, cx = np.unravel_index(int(np.argmax(crop)), crop.shape)
    grid = np.zeros((224 // patch, 224 // patch), np.float32)
    grid[cy // patch, cx // patch] = 1
    heat = patch_grid_to_image(tiny_model, grid, size, None)
    assert heat.shape == (h, w) and heat.dtype == np.float32
    py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
    cell = patch * max(w / new_w, h / new_h)  # a patch, in image pixels
    assert abs(px - x) <= cell and abs(py - y) <= cell
    inside = np.zeros_like(heat, bool)
    x0, x1 = left * w / new_w, (left + 224) * w / new_w
    y0, y1 = top * h / new_h, (top + 224) * h / new_h
    cols, rows = np.arange(w) + 0.5, np.arange(h) + 0.5
    inside[(rows >= y0) & (rows < y1)] = True
    inside[:, (cols < x0) | (cols >= x1)] = False
    assert heat[~inside].max(initial=0) == 0


@pytest.mark.parametrize("method", list(METHODS))
def test_maps_in_each_images_coordinates_batched_as_one_by_one(tiny_model, method):
    images = [picture(160, 100, 1), picture(90, 120, 2), picture(224, 224, 3)]
    maps = tiny_model.heatmap(images, "a red circle", method=method, batch_size=2)
    assert [m.shape for m in maps] == [(100, 160), (120, 90), (224, 224)]
    for image, heat in zip(images, maps):
        assert heat.dtype == np.float32 and heat.max() == pytest.approx(1.0) and heat.min() >= 0
        alone = tiny_model.heatmap(image, "a red circle", method=method)
        assert len(alone) == 1
        np.testing.assert_allclose(alone[0], heat, atol=1e-4)
    assert tiny_model.heatmap(images[0], "a red circle", method=method, max_side=40)[0].shape == (25, 40)


def test_methods_differ_and_text_matters(tiny_model):
    image = picture(128, 128, 4)
    red = {m: tiny_model.heatmap(image, "a red circle", method=m)[0] for m in METHODS}
    blue = tiny_model.heatmap(image, "a blue square")[0]
    assert not np.allclose(red["gradient"], red["patch"], atol=1e-3)
    assert not np.allclose(red["patch"], red["smoothed"], atol=1e-3)
    assert not np.allclose(red[DEFAULT_METHOD], blue, atol=1e-3)


@pytest.mark.parametrize("grid, at, expected", [
    ((4, 5), (1, 2), 9),   # inside: the full 3x3 neighbourhood
    ((4, 5), (0, 0), 4),   # a corner: 2x2 tokens
    ((4, 5), (3, 2), 6),   # the bottom edge: 2x3 tokens
    ((1, 3), (0, 1), 3),   # one row
])
def test_neighbourhoods_average_the_3x3_around_each_patch_on_its_grid(grid, at, expected):
    """Token i of a row-major (rows, cols) grid is 1 at one coordinate: every token whose 3x3 neighbourhood holds
    it gets 1/(tokens in that neighbourhood) there, the others 0."""
    rows, cols = grid
    tokens = torch.eye(rows * cols)[None]  # [1, P, H=P]: token i is the unit vector i
    out = neighbourhoods(tokens, grid)[0]
    r, c = at
    near = [(i, j) for i in range(r - 1, r + 2) for j in range(c - 1, c + 2) if 0 <= i < rows and 0 <= j < cols]
    assert len(near) == expected
    np.testing.assert_allclose(out[r * cols + c].sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[r * cols + c][[i * cols + j for i, j in near]], 1 / expected, rtol=1e-6)


def test_a_method_may_be_a_function_given_the_row_major_grid(tiny_model):
    """A wide pixel tensor (16 x 20 patches): the function gets that grid, and its scores land where it put them."""
    seen = []

    def one_patch(model, cls, patches, text, grid):
        seen.append((patches.shape[1], grid))
        scores = torch.zeros(patches.shape[:2])
        scores[:, 3 * grid[1] + 17] = 1  # row 3, column 17
        return scores

    patch = tiny_model.image_encoder.patch_size
    (heat,) = tiny_model.heatmap(torch.zeros(3, 16 * patch, 20 * patch), "a red circle", method=one_patch)
    assert seen == [(16 * 20, (16, 20))]
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    assert (row // patch, col // patch) == (3, 17)


def test_pixels_give_maps_of_the_crop(tiny_model):
    pixels = torch.stack([tiny_model.preprocess(picture(64, 64, i)) for i in range(2)])
    maps = tiny_model.heatmap(pixels, "a red circle")
    assert [m.shape for m in maps] == [(224, 224)] * 2


def test_an_unreadable_image_gets_no_map_and_is_named(tiny_model, image_folder):
    files = sorted(image_folder.iterdir())
    bad = files.index(image_folder / "corrupt.jpg")
    with pytest.warns(UserWarning, match="corrupt.jpg"):
        maps = tiny_model.heatmap(files, "a red circle")
    assert maps[bad] is None and all(m is not None for i, m in enumerate(maps) if i != bad)
    named = {}
    tiny_model.heatmap(files, "x", on_error=lambda i, msg: named.setdefault(i, msg))
    assert list(named) == [bad] and "corrupt.jpg" in named[bad]


@pytest.mark.parametrize("text", ["", "x" * 10_000, "a dog " * 2_000])
def test_empty_and_huge_queries_give_maps(tiny_model, text):
    (heat,) = tiny_model.heatmap(picture(64, 48), text)
    assert heat.shape == (48, 64) and np.isfinite(heat).all()


@pytest.mark.parametrize("case, match", [
    ("cls", "pooling is 'cls'"),
    ("no_text", "without its text encoder"),
    ("method", "unknown heatmap method 'nope'"),
    ("text_type", "must be a string"),
])
def test_refusals_are_one_line(tiny_dir, tmp_path, case, match):
    if case == "cls":
        model = dinov2clip.load(str(dinov2clip.make_tiny(str(tmp_path / "cls"), pooling="cls")), device="cpu")
    else:
        model = dinov2clip.load(str(tiny_dir), device="cpu", text=case != "no_text")
    with pytest.raises(UserError, match=match) as e:
        model.heatmap([picture(32, 32)], ["a", "b"] if case == "text_type" else "a red circle",
                      **({"method": "nope"} if case == "method" else {}))
    assert "\n" not in str(e.value)


# -- command line ----------------------------------------------------------------------------------------------
def test_explain_writes_an_overlay_of_the_images_size(tiny_dir, tmp_path):
    image = tmp_path / "scene.jpg"
    picture(120, 80).save(image)
    out = tmp_path / "overlay.png"
    res = run("explain", image, "a red circle", "--out", out, "--model", tiny_dir, "--dtype", "fp32")
    assert res.returncode == 0, res.stderr
    assert is_overlay(out) and Image.open(out).size == (120, 80)
    assert Image.open(out).text["query"] == "a red circle"
    res = run("explain", image, "a blue square", "--out", out, "--model", tiny_dir, "--method", "gradient")
    assert res.returncode == 0, res.stderr  # its own overlay is replaced
    assert Image.open(out).text == {"dinov2clip-heatmap": "gradient", "query": "a blue square"}


@pytest.mark.parametrize("case, expected", [
    ("theirs", "is not a heatmap overlay dinov2clip wrote"),
    ("folder", "is a folder"),
    ("unreadable", "cannot read image"),
    ("missing", "no such image file"),
    ("suffix", "ending in .png"),
])
def test_explain_refuses_in_one_line(tiny_dir, tmp_path, case, expected):
    image = tmp_path / "scene.png"
    picture(40, 40).save(image)
    out = tmp_path / "overlay.png"
    if case == "theirs":
        picture(10, 10).save(out)
    elif case == "folder":
        out.mkdir()
    elif case == "unreadable":
        image.write_bytes(b"not an image")
    elif case == "missing":
        image = tmp_path / "nope.png"
    elif case == "suffix":
        out = tmp_path / "overlay.jpg"
    before = out.read_bytes() if out.is_file() else None
    res = run("explain", image, "a red circle", "--out", out, "--model", tiny_dir)
    assert res.returncode == 2 and expected in one_line(res.stderr)
    if before is not None:
        assert out.read_bytes() == before


def test_explain_rejects_a_bad_method_before_loading_anything(tmp_path):
    res = run("explain", tmp_path / "x.png", "q", "--out", tmp_path / "o.png", "--method", "magic",
              "--model", tmp_path / "no-model")
    assert res.returncode == 2 and "choose one of gradient, patch" in res.stderr


def test_search_explains_its_top_hits(tiny_dir, image_folder, tmp_path):
    emb = tmp_path / "emb.npz"
    assert run("embed", image_folder, "--model", tiny_dir, "--out", emb, "--quiet").returncode == 0
    res = run("search", emb, "a red circle", "-k", "3", "--explain", tmp_path / "why")
    assert res.returncode == 0, res.stderr
    hits = [line.split("\t")[1] for line in res.stdout.splitlines() if not line.startswith("heatmap")]
    written = sorted((tmp_path / "why").iterdir())
    assert [p.name for p in written] == [f"{r:02d}-{Path(h).stem}.png" for r, h in enumerate(hits, 1)]
    for path, hit in zip(written, hits):
        assert is_overlay(path) and Image.open(path).size == Image.open(hit).size
    (tmp_path / "file").write_text("mine")
    res = run("search", emb, "a red circle", "--explain", tmp_path / "file")
    assert res.returncode == 2 and "is a file" in one_line(res.stderr)

"""Seeded synthetic data for offline runs and tests.

- `write_shapes_shards`: img2dataset-style webdataset shards (`{key}.jpg/.txt/.json`) of coloured
  shapes whose captions name the colour and the shape ("a red circle"): the tiny pipeline's data.
- `scene`: two or three such shapes in one picture, one of them queried: the heatmaps' pointing game.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from dinov2clip.atomic import atomic_path
from dinov2clip.errors import UserError

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 220, 40),
           "purple": (150, 40, 190), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
VERSION = 1  # bump when what a seed draws changes: a pipeline run drawn by another version is not resumed
BACKGROUNDS = ("dark", "light", "gradient", "noise")


def background(rng: np.random.Generator, size: tuple[int, int], kind: str = "dark"):
    """A (w, h) RGB background: one dark or light colour, a vertical gradient between two colours, or noise."""
    from PIL import Image

    w, h = size
    if kind in ("dark", "light"):
        return Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 90, 3) + (0 if kind == "dark" else 166)))
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8))
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    return Image.fromarray(np.repeat(a + np.linspace(0, 1, h)[:, None] * (b - a), w, axis=0)
                           .reshape(h, w, 3).astype(np.uint8))


def shape_image(rng: np.random.Generator, colour: str, shape: str, size: int = 64, scale=(0.2, 0.4),
                backgrounds=("dark",)):
    """One RGB image: a `colour` `shape` at a random place, its radius a random share (`scale`) of the size, on
    a random background of one of the `backgrounds` kinds."""
    kind = backgrounds[rng.integers(len(backgrounds))] if len(backgrounds) > 1 else backgrounds[0]
    return draw_shape(rng, background(rng, (size, size), kind), colour, shape, scale)


def draw_shape(rng: np.random.Generator, img, colour: str, shape: str, scale=(0.2, 0.4)):
    """Draw a `colour` `shape` on `img` at a random place, its radius a random share (`scale`) of the size."""
    size = img.size[0]
    r = rng.uniform(*scale) * size
    cx, cy = rng.uniform(r, size - r, 2)
    return draw_shape_at(img, colour, shape, cx, cy, r)


def draw_shape_at(img, colour: str, shape: str, x: float, y: float, r: float):
    """Draw a `colour` `shape` of radius `r` centred at (x, y) on `img`; returns `img`."""
    from PIL import ImageDraw

    draw, fill = ImageDraw.Draw(img), COLOURS[colour]
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return img


def write_shapes_shards(out_dir, n: int, per_shard: int = 500, seed: int = 0, size: int = 64,
                        prefix: str = "shapes", corrupt: int = 0, scale=(0.2, 0.4),
                        backgrounds=("dark",)) -> list[Path]:
    """`n` captioned shape images (`shape_image`) in tar shards `{prefix}-00000.tar`...; `corrupt` samples
    carry undecodable JPEG bytes (the precompute must skip and count them). Returns the shard paths."""
    unknown = [k for k in backgrounds if k not in BACKGROUNDS]
    if unknown or not backgrounds:
        raise UserError(f"shapes backgrounds {list(backgrounds)}: choose from {', '.join(BACKGROUNDS)}")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 0.5:
        raise UserError(f"shapes scale {list(scale)}: give [low, high] radii as shares of the image, 0 < low <= "
                        "high <= 0.5")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours, paths = list(COLOURS), []
    bad = set(rng.choice(n, size=min(corrupt, n), replace=False).tolist()) if corrupt else set()
    for s, start in enumerate(range(0, n, per_shard)):
        path = out / f"{prefix}-{s:05d}.tar"
        with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
            for i in range(start, min(start + per_shard, n)):
                colour, shape = colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))]
                buf = io.BytesIO()
                shape_image(rng, colour, shape, size, scale, backgrounds).save(buf, format="JPEG", quality=90)
                key = f"{s:05d}{i - start:04d}"
                caption = f"a {colour} {shape}"
                data = buf.getvalue() if i not in bad else b"\xff\xd8\xff\xe0 not a jpeg"
                meta = {"key": key, "caption": caption, "colour": colour, "shape": shape}
                for ext, payload in (("jpg", data), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


SCENE_SIZES = ((128, 128), (160, 128), (128, 160))


def scene(rng: np.random.Generator, crop_share: float = 224 / 256):
    """Two or three shapes of different colours at random places and sizes, boxes apart, inside the centre crop
    a model sees (`crop_share` of the short side), on a random background, in a square, wide or tall image; one
    of them is queried. → (PIL image, the queried shape's caption, its box (x0, y0, x1, y1), the crop box)."""
    w, h = SCENE_SIZES[rng.integers(len(SCENE_SIZES))]
    img = background(rng, (w, h), BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    side = min(w, h) * crop_share
    cx0, cy0 = (w - side) / 2, (h - side) / 2
    boxes, captions = [], []
    for colour in rng.permutation(list(COLOURS))[: rng.integers(2, 4)]:
        shape = SHAPES[rng.integers(len(SHAPES))]
        for _ in range(100):  # a place whose box overlaps no earlier box
            r = rng.uniform(0.1, 0.2) * side
            x, y = rng.uniform(cx0 + r, cx0 + side - r), rng.uniform(cy0 + r, cy0 + side - r)
            box = (x - r, y - r, x + r, y + r)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                break
        draw_shape_at(img, colour, shape, x, y, r)
        boxes.append(box), captions.append(f"a {colour} {shape}")
    q = rng.integers(len(boxes))
    return img, captions[q], boxes[q], (cx0, cy0, cx0 + side, cy0 + side)

"""Seeded synthetic data for offline runs and tests.

- `write_shapes_shards`: img2dataset-style webdataset shards (`{key}.jpg/.txt/.json`) of coloured
  shapes whose captions name the colour and the shape ("a red circle"): the tiny pipeline's data.
- `scene`: two or three such shapes in one picture, one of them queried: the heatmaps' pointing game.
- `planted_alignment`: inputs whose true map to unit-norm targets is known (a random 3-layer
  GELU+LayerNorm MLP plus noise), written in the precompute format, to check the trainer learns it.
"""
from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinov2clip.atomic import atomic_path
from dinov2clip.errors import UserError

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 220, 40),
           "purple": (150, 40, 190), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
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


# -- planted alignment ----------------------------------------------------------------------------

class PlantedMap(nn.Module):
    """The true map: 3 × (Linear → LayerNorm → GELU) then Linear, output L2-normalised."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        super().__init__()
        layers, d = [], in_dim
        for _ in range(3):
            layers += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.GELU()]
            d = hidden
        self.net = nn.Sequential(*layers, nn.Linear(d, out_dim))

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)


def add_noise(clean: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Unit-norm `clean` + isotropic Gaussian noise of norm ~`sigma`, renormalised."""
    noise = torch.randn(clean.shape, generator=gen) / math.sqrt(clean.shape[1])
    return F.normalize(clean + sigma * noise, dim=-1)


def recall_at_1(pred: torch.Tensor, target: torch.Tensor) -> float:
    """target → pred R@1 among all rows (the trainer's `image_retrieval_recall@1`)."""
    from .metrics import retrieval_recall

    return retrieval_recall(pred, target, list(range(len(pred))), ks=(1,))["image_retrieval_recall@1"]


def calibrate_noise(recall_of, goal: float, hi: float = 16.0) -> float:
    """The noise level at which `recall_of(level)` (falling as the level rises) is ~`goal`: bisection."""
    lo = 0.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if recall_of(mid) > goal else (lo, mid)
    return (lo + hi) / 2


def planted_alignment(out_dir, n_train: int = 200_000, n_val: int = 5_000, n_test: int = 5_000,
                      in_dim: int = 768, out_dim: int = 512, hidden: int = 512, target_r1: float = 0.6,
                      text_r1: float = 0.3, text_sigma: float | None = None, per_shard: int = 50_000,
                      seed: int = 0) -> dict:
    """Write train/val/test in the precompute format (inputs as `cls`, so train with pooling 'cls').

    Noise levels are set by bisection on a calibration draw of `n_val` pairs: targets = true map + noise
    such that the true map's own recall@1 retrieving the targets is ~`target_r1`; text targets = targets +
    independent noise such that the true map's recall@1 retrieving the *texts* is ~`text_r1` (like a
    caption, noisier than the image embedding but still informative) unless `text_sigma` is given. (At the
    full size, text noise as large as the targets' own leaves the true map at recall 0.004 on texts: a
    contrastive loss would then learn from almost nothing.) Returns the levels and the true map's recalls."""
    from .shards import write_shard

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    true_map = PlantedMap(in_dim, out_dim, hidden).eval()
    # inputs are scaled like LayerNormed DINOv2 features (unit variance per dimension)

    def draw(n):
        x = torch.randn(n, in_dim, generator=gen)
        with torch.no_grad():
            return x, true_map(x)

    _, cc = draw(n_val)
    noise1 = torch.randn(cc.shape, generator=gen) / math.sqrt(out_dim)
    noise2 = torch.randn(cc.shape, generator=gen) / math.sqrt(out_dim)
    sigma = calibrate_noise(lambda s: recall_at_1(cc, F.normalize(cc + s * noise1, dim=-1)), target_r1)
    cal_target = F.normalize(cc + sigma * noise1, dim=-1)
    if text_sigma is None:
        text_sigma = calibrate_noise(lambda s: recall_at_1(cc, F.normalize(cal_target + s * noise2, dim=-1)), text_r1)
    out = Path(out_dir)
    figures = {"sigma": sigma, "text_sigma": text_sigma}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for s, start in enumerate(range(0, n, per_shard)):
            m = min(per_shard, n - start)
            x, clean = draw(m)
            target = add_noise(clean, sigma, gen)
            text = add_noise(target, text_sigma, gen)
            keys = [f"{split}{start + i:08d}" for i in range(m)]
            write_shard(out / split, f"{split}-{s:05d}",
                        {"dinov2_cls": x.numpy(), "dinov2_patch_mean": x.numpy(), "clip_image": target.numpy(),
                         "clip_text": text.numpy()},
                        keys, [""] * m, {"num_patches": 0, "source": "planted", "skipped": 0, "skipped_keys": {}})
            if split == "test" and s == 0:  # the ceilings: the true map retrieving targets, and captions
                figures["true_map_test_r1"] = recall_at_1(clean, target)
                figures["true_map_test_r1_text"] = recall_at_1(clean, text)
    (out / "planted.json").write_text(json.dumps({**figures, "seed": seed, "in_dim": in_dim, "out_dim": out_dim,
                                                  "n_train": n_train, "n_val": n_val, "n_test": n_test}, indent=2))
    return figures

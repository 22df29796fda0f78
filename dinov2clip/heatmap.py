"""Text heatmaps over DINOv2 patches: which parts of an image make it match a text.

One forward pass of DINOv2 gives the patch tokens; a method scores each patch for the text through the model's
own pooling and projector; the patch grid is mapped back through the preprocessing's resize and centre crop
into the image's own coordinates (outside the crop the model sees: 0).

Methods (docs/heatmaps.md compares them on the pointing game):
- `gradient`: gradient × input of the text score over the final patch tokens, through pool → projector
  (training-free; one backward pass through the projector).
- `patch`: each patch scored as if the whole image looked like it: the text score of
  projector(pool(CLS, patch)), i.e. the pooled vector with the patch mean replaced by that one patch
  (training-free; the projector runs once per patch, batched).
- `smoothed` (the default): `patch`'s scores averaged over each patch's 3×3 neighbourhood, after the projector:
  a peak needs a whole object's worth of agreeing patches, so a stray patch elsewhere cannot win it
  (training-free; the cost of `patch`).

A method is a function (model, CLS [B, H], patch tokens [B, P, H], unit text embedding [D], grid (rows, cols))
→ patch scores [B, P] on that row-major grid; `heatmaps` also takes such a function in place of a name.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .dinov2 import pool
from .errors import UserError
from .embed import iter_pixel_batches
from .preprocess import load_rgb


def _gradient(model, cls: torch.Tensor, patches: torch.Tensor, text: torch.Tensor, grid=None) -> torch.Tensor:
    pooling = model.image_encoder.pooling
    patches = patches.detach().requires_grad_(True)
    with torch.enable_grad():
        x = pool(cls, patches.mean(dim=1), pooling, patches.shape[1])
        score = (F.normalize(model.projector(x).float(), dim=-1) @ text).sum()
        (grad,) = torch.autograd.grad(score, patches)
    return (grad * patches).sum(dim=-1)


def _patch(model, cls: torch.Tensor, patches: torch.Tensor, text: torch.Tensor, grid=None) -> torch.Tensor:
    b, p, h = patches.shape
    x = pool(cls[:, None].expand(b, p, h), patches, model.image_encoder.pooling, p)
    return F.normalize(model.projector(x.reshape(b * p, -1)).float(), dim=-1).matmul(text).reshape(b, p)


def neighbourhoods(patches: torch.Tensor, grid: tuple[int, int], size: int = 3) -> torch.Tensor:
    """[B, P, H] patch tokens → the mean of each one's `size`×`size` neighbourhood on the (rows, cols) grid
    (fewer tokens at the borders)."""
    b, p, h = patches.shape
    x = patches.transpose(1, 2).reshape(b, h, *grid)
    x = F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)
    return x.reshape(b, h, p).transpose(1, 2)


def _smoothed(model, cls: torch.Tensor, patches: torch.Tensor, text: torch.Tensor, grid: tuple[int, int]
              ) -> torch.Tensor:
    return neighbourhoods(_patch(model, cls, patches, text)[..., None], grid)[..., 0]


METHODS: dict[str, Callable] = {"gradient": _gradient, "patch": _patch, "smoothed": _smoothed}
DEFAULT_METHOD = "smoothed"


def check(model, method: str | Callable = DEFAULT_METHOD) -> None:
    """Refuse, in one line, what cannot give a map: an unknown method, a model without its image tower, text
    tower or projector, or a pooling that gives the projector no patch (`cls`)."""
    if not callable(method) and method not in METHODS:
        raise UserError(f"unknown heatmap method {method!r}: choose one of {', '.join(METHODS)}")
    for part, flag in (("image_encoder", "image=True"), ("text_encoder", "text=True")):
        if getattr(model, part, None) is None:
            raise UserError(f"this model was loaded without its {part.replace('_', ' ')}, which a heatmap needs: "
                            f"load it with {flag}")
    if getattr(model, "projector", None) is None:
        raise UserError("heatmaps need a projector: load a model (dinov2clip.load), not encoders alone")
    if model.image_encoder.pooling == "cls":
        raise UserError("this model's pooling is 'cls': its projector sees only the CLS token, so no patch "
                        "carries a spatial signal to map (heatmaps need 'mean' or 'cls+mean' pooling)")


def _name(image) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"image {type(image).__name__}"


def _interpolation(n_out: int, extent: float, resized: int, offset: int, crop: int, patch: int) -> np.ndarray:
    """[n_out, crop // patch] bilinear weights from the patch grid to `n_out` output pixels along one axis of
    an image `extent` wide (pixel centres), resized to `resized` and cropped at `offset`; 0 outside the crop."""
    grid = crop // patch
    at = (np.arange(n_out) + 0.5) * (extent / n_out) * (resized / extent) - offset  # in the crop, in pixels
    u = np.clip(at / patch - 0.5, 0, grid - 1)  # patch centres at 0, 1, ... grid-1
    lo = np.minimum(np.floor(u).astype(int), grid - 2) if grid > 1 else np.zeros(n_out, int)
    frac = u - lo if grid > 1 else np.zeros(n_out)
    w = np.zeros((n_out, grid), np.float32)
    rows = np.arange(n_out)
    w[rows, lo] = 1 - frac
    if grid > 1:
        w[rows, lo + 1] += frac
    w[(at < 0) | (at >= crop)] = 0
    return w


def patch_grid_to_image(model, scores: np.ndarray, size: tuple[int, int] | None, max_side: int | None) -> np.ndarray:
    """Patch scores [gh, gw] → a float32 map in the image's coordinates, 0..1 inside the crop (1 = the patch
    most responsible), 0 outside it. `size` None: the input was pixels; the map covers the crop."""
    patch = model.image_encoder.patch_size
    lo, hi = float(scores.min()), float(scores.max())
    scores = (scores - lo) / (hi - lo) if hi > lo else np.zeros_like(scores)
    if size is None:  # pixels: the map covers them
        crop_h, crop_w = scores.shape[0] * patch, scores.shape[1] * patch
        w, h, new_w, new_h, left, top = crop_w, crop_h, crop_w, crop_h, 0, 0
    else:
        crop_h = crop_w = model.preprocess.config.crop
        w, h = size
        new_w, new_h, left, top = model.preprocess.geometry(size)
    scale = min(1.0, max_side / max(w, h)) if max_side else 1.0
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    ay = _interpolation(out_h, h, new_h, top, crop_h, patch)
    ax = _interpolation(out_w, w, new_w, left, crop_w, patch)
    out = (ay @ scores.astype(np.float32) @ ax.T).astype(np.float32)
    peak = float(out.max())
    return out / peak if peak > 0 else out


def heatmaps(model, images, text: str, method: str | Callable = DEFAULT_METHOD, batch_size: int | None = None,
             max_side: int | None = None,
             on_error: Callable[[int, str], None] | None = None) -> list[np.ndarray | None]:
    """One float32 2-D map per image, in that image's coordinates (rows top to bottom, its aspect ratio; its
    resolution, or its longest side `max_side`): higher = more responsible for the text's score, 1 at the peak,
    0 outside the centre crop the model sees. Preprocessed pixel tensors give maps of the crop.

    An unreadable image gets None, and `on_error(index, message)` (default: a warning naming it)."""
    check(model, method)
    if not isinstance(text, str):
        raise UserError(f"the heatmap's text must be a string, not {type(text).__name__}")
    if isinstance(images, (str, os.PathLike, bytes)) or not isinstance(images, (Sequence, torch.Tensor)):
        images = [images]
    elif torch.is_tensor(images) and images.ndim == 3:
        images = images[None]
    elif len(images) and all(torch.is_tensor(x) for x in images):
        images = torch.stack(list(images))
    report = on_error or (lambda i, msg: warnings.warn(f"no heatmap: {msg}", stacklevel=3))
    query = model.encode_text([text])[0].to(model.device)
    batch_size = batch_size or model.batch_size
    out: list[np.ndarray | None] = [None] * len(images)
    if torch.is_tensor(images):  # pixels: maps of the crop
        batches = ((list(range(s, min(s + batch_size, len(images)))), {"pixels": images[s:s + batch_size]}, [])
                   for s in range(0, len(images), batch_size))
    else:  # the core's image loop; each map in its image's coordinates
        batches = iter_pixel_batches({"pixels": model.preprocess, "size": lambda rgb: torch.tensor(rgb.size)},
                                     images, batch_size, background=model.preprocess.config.background)
    for kept, got, failures in batches:
        for i, msg in failures:
            report(i, msg or f"cannot read {_name(images[i])}")
        if not kept:
            continue
        sizes = [tuple(s) for s in got["size"].tolist()] if "size" in got else [None] * len(kept)
        batch = got["pixels"].to(model.device)
        with torch.inference_mode(False), torch.no_grad(), model.autocast():
            cls, patches = model.image_encoder.tokens(batch)
        gh, gw = batch.shape[-2] // model.image_encoder.patch_size, batch.shape[-1] // model.image_encoder.patch_size
        with torch.inference_mode(False):
            score = method if callable(method) else METHODS[method]
            scores = score(model, cls.float().clone(), patches.float().clone(), query.clone(), (gh, gw))
        scores = scores.detach().float().cpu().numpy().reshape(len(kept), gh, gw)
        for i, s, size in zip(kept, scores, sizes):
            out[i] = patch_grid_to_image(model, s, size, max_side)
    return out


# -- overlays a person looks at ------------------------------------------------------------------------------
# A perceptually ordered colour scale (dark purple → red → yellow, after matplotlib's "inferno"): 0 → 1.
_SCALE = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], np.float32)
OVERLAY_MARK = "dinov2clip-heatmap"  # a PNG text chunk: an overlay we wrote, which a rerun may replace


def overlay(image, heatmap: np.ndarray, alpha: float = 0.6):
    """The image (dimmed, in grey) under its heatmap's colours, opaque where the map is high: a PIL RGB image."""
    from PIL import Image

    rgb = load_rgb(image) if not isinstance(image, Image.Image) else image.convert("RGB")
    if heatmap.shape != (rgb.height, rgb.width):
        heatmap = np.asarray(Image.fromarray(heatmap).resize(rgb.size, Image.Resampling.BILINEAR))
    m = np.clip(heatmap, 0, 1)
    pos = m * (len(_SCALE) - 1)
    lo = np.minimum(pos.astype(int), len(_SCALE) - 2)
    colour = _SCALE[lo] + (pos - lo)[..., None] * (_SCALE[lo + 1] - _SCALE[lo])
    grey = np.asarray(rgb.convert("L"), np.float32)[..., None] * 0.7
    weight = alpha * m[..., None] ** 0.5
    return Image.fromarray((grey * (1 - weight) + colour * weight).clip(0, 255).astype(np.uint8), "RGB")


def is_overlay(path) -> bool:
    """Whether `path` is an overlay `save_overlay` wrote (so replacing it destroys nothing of the user's)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return OVERLAY_MARK in getattr(img, "text", {})
    except Exception:  # not an image at all: not ours
        return False


def check_overlay_path(path) -> None:
    """Refuse, before any work, an output that is a folder or a file this project did not write."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder: give a file path such as {path / 'overlay.png'}")
    if path.suffix.lower() != ".png":
        raise UserError(f"{path}: overlays are written as PNG; give a path ending in .png")
    if path.exists() and not is_overlay(path):
        raise UserError(f"{path} exists and is not a heatmap overlay dinov2clip wrote: refusing to overwrite it")


def save_overlay(path, image, heatmap: np.ndarray, text: str, method: str) -> None:
    """Write `overlay(image, heatmap)` as a PNG (temporary name, then renamed) recording the text and method."""
    from pathlib import Path

    from PIL.PngImagePlugin import PngInfo

    from .atomic import atomic_path

    check_overlay_path(path)
    info = PngInfo()
    info.add_text(OVERLAY_MARK, method)
    info.add_itxt("query", text[:1000])
    with atomic_path(Path(path)) as tmp:
        overlay(image, heatmap).save(tmp, format="PNG", pnginfo=info)

"""The one image pipeline every front-end uses (DESIGN §2).

open → EXIF transpose → RGB (alpha flattened on white; 16-bit, palette, CMYK handled)
→ bicubic resize of the shortest edge to 256 → centre crop 224 → ImageNet mean/std.
No `AutoImageProcessor` at run time: it differs between transformers 4 and 5.
"""
from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import ImageError

ImageInput = Union[str, os.PathLike, bytes, Image.Image]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class PreprocessConfig:
    # Bump `version` whenever the pixels this pipeline produces change: cached embeddings key on it.
    version: int = 1
    resize: int = 256
    crop: int = 224
    interpolation: str = "bicubic"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    background: tuple = BACKGROUND

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _describe(image) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"<{type(image).__name__}>"


def open_image(image: ImageInput) -> Image.Image:
    """Open and fully decode an image; every failure becomes one `ImageError` naming the input."""
    try:
        if isinstance(image, Image.Image):
            image.load()
            return image
        source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else Path(image)
        img = Image.open(source)
        img.load()  # decode now so truncated files fail here, not inside a batch
        return img
    except ImageError:
        raise
    except Exception as e:  # PIL raises OSError, ValueError, DecompressionBombError, SyntaxError...
        raise ImageError(f"cannot read image {_describe(image)}: {type(e).__name__}: {e}") from None


def to_rgb(img: Image.Image, background: tuple = BACKGROUND) -> Image.Image:
    """Any PIL mode → 8-bit RGB, without the clipping `convert` does on 16/32-bit data."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit data (PNG loads it as I or I;16) is scaled, not clipped; 8-bit-range data passes.
        scale = 255.0 / 65535.0 if mode.startswith("I") and arr.max(initial=0) > 255 else 1.0
        arr = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info) \
        or (mode in ("L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(image: ImageInput, background: tuple = BACKGROUND) -> Image.Image:
    """Open, apply the EXIF orientation, and convert to RGB."""
    img = open_image(image)
    try:
        img = ImageOps.exif_transpose(img)
        return to_rgb(img, background)
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"cannot convert image {_describe(image)}: {type(e).__name__}: {e}") from None


class Preprocess:
    """Callable `image → float32 [3, crop, crop]` tensor, as open_clip's `preprocess`."""

    def __init__(self, config: PreprocessConfig = PreprocessConfig()):
        self.config = config
        self._mean = np.asarray(config.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(config.std, dtype=np.float32).reshape(3, 1, 1)

    def geometry(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """An image of `size` (w, h) → (resized w, resized h, crop left, crop top): where the crop the model sees
        lies in it (heatmaps map the patch grid back through this)."""
        c = self.config
        w, h = size
        # Same size arithmetic as torchvision Resize(int) + CenterCrop, so outputs can be compared.
        if w <= h:
            new_w, new_h = c.resize, int(c.resize * h / w)
        else:
            new_w, new_h = int(c.resize * w / h), c.resize
        return new_w, new_h, int(round((new_w - c.crop) / 2.0)), int(round((new_h - c.crop) / 2.0))

    def resize_crop(self, img: Image.Image) -> Image.Image:
        new_w, new_h, left, top = self.geometry(img.size)
        if (new_w, new_h) != img.size:
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        return img.crop((left, top, left + self.config.crop, top + self.config.crop))

    def __call__(self, image: ImageInput) -> torch.Tensor:
        img = self.resize_crop(load_rgb(image, self.config.background))
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((arr - self._mean) / self._std)

    def __repr__(self) -> str:
        return f"Preprocess({self.config})"


"""`DinoV2Clip`: DINOv2 → pooling → projector → CLIP space, with CLIP's own text tower."""
from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import identity
from .config import ModelConfig
from .dinov2 import pool
from .errors import UserError
from .preprocess import ImageInput, Preprocess, PreprocessConfig


# No token of CLIP's vocabulary spans more than 32 characters, so the context_length tokens CLIP keeps of a text
# lie in its first 32 × context_length characters, unless whitespace runs or HTML entities (which the tokenizer
# collapses) pad them: cutting there leaves a text that fits CLIP's context as it was, and bounds the tokenizer's
# work on one that does not (byte-pair merging is quadratic in a word's length: one very long word without spaces
# stalled the App before CLIP cut it to 77 tokens). What a text means is its first this many characters.
TEXT_CHARS_PER_TOKEN = 32


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_fast_bf16() -> bool:
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else ""
    return "AVX512" in capability and torch.backends.mkldnn.is_available() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """'auto' = fp32 on CPU unless the CPU has native bf16; bf16 (or fp16) on CUDA; fp32 on MPS."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or "auto").lower()
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name in table:
        return table[name]
    if name != "auto":
        raise UserError(f"unknown dtype {dtype!r}: use auto, fp32, bf16 or fp16")
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


class Encoders(nn.Module):
    """A model's towers without its projector: DINOv2 + pooling, CLIP's text tower (and its image tower,
    the teacher, when asked for), with both preprocessings. Its identity: `encoder_fingerprint`.

    Precompute, the evaluation teacher, Karpathy validation and text-only processes need nothing more, so
    they run before any projector exists. Build it with `dinov2clip.load_encoders(...)`; `__init__` only
    assembles already-loaded parts."""

    def __init__(self, config: ModelConfig, image_encoder: nn.Module | None = None,
                 text_encoder: nn.Module | None = None, tokenizer=None, device: str | None = None,
                 dtype: str | torch.dtype | None = "auto", batch_size: int = 32):
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.preprocess = Preprocess(PreprocessConfig.from_dict(config.preprocess))
        self.device = torch.device(device or default_device())
        self.dtype = resolve_dtype(dtype, self.device.type)
        self.batch_size = batch_size
        self._teacher_transform = None
        self.to(self.device).eval()

    # -- identity -------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """The CLIP space's dimension (the text tower's output)."""
        if self.text_encoder is not None:
            return self.text_encoder.embed_dim
        return self.config.clip.get("embed_dim") or self.config.embed_dim

    @property
    def encoder_fingerprint(self) -> str:
        return identity.encoders(self.config)

    @property
    def dinov2_provenance(self) -> dict:
        """What the projector's input is; stored with every DINOv2 embedding."""
        d = self.config.dinov2
        return {"source": d.get("origin") or d["source"], "pooling": d["pooling"],
                "preprocess_version": self.config.preprocess.get("version"),
                "encoder_fingerprint": self.encoder_fingerprint}

    def found_config(self) -> ModelConfig:
        """The config with what building the loaded towers found (DINOv2 class and width, CLIP's embedding
        dimension and activation): what a written config records. The config given is left as it was."""
        dinov2, clip = dict(self.config.dinov2), dict(self.config.clip)
        if self.image_encoder is not None:
            dinov2.update({"class": self.image_encoder.kind, "hidden_size": self.image_encoder.hidden_size})
        if self.text_encoder is not None:
            clip.update({"embed_dim": self.text_encoder.embed_dim, "quick_gelu": "quickgelu" in clip["model_name"]
                         or bool(getattr(self.text_encoder.clip, "_quick_gelu", False))})
        return replace(self.config, dinov2=dinov2, clip=clip)

    # -- encoding -------------------------------------------------------------------------
    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _require(self, part: str):
        if getattr(self, part) is None:
            raise UserError(f"this model was loaded without its {part.replace('_', ' ')}: "
                            f"load it with {'image' if 'image' in part else 'text'}=True")

    @torch.inference_mode()
    def encode_dinov2(self, pixels: torch.Tensor, pooling: str | None = None) -> torch.Tensor:
        """Preprocessed pixels [B, 3, H, W] → raw pooled DINOv2 embedding, float32; `pooling` (default: the
        model's) pools the same features another way."""
        self._require("image_encoder")
        with self.autocast():
            cls, patch_mean, num_patches = self.image_encoder.features(pixels.to(self.device, non_blocking=True))
            return pool(cls, patch_mean, pooling or self.image_encoder.pooling, num_patches).float()

    # -- the CLIP teacher's image side ------------------------------------------------------
    @property
    def teacher(self) -> nn.Module:
        """The open_clip CLIP whose text tower this model uses, with its image tower (`teacher=True`)."""
        clip = getattr(self.text_encoder, "clip", None)
        if clip is None or getattr(clip, "visual", None) is None:
            raise UserError(f"this {type(self).__name__} was loaded without the CLIP teacher's image tower: "
                            "load it with teacher=True")
        return clip

    @property
    def teacher_transform(self):
        """open_clip's own evaluation transform for the teacher (PIL RGB image → pixels)."""
        if self._teacher_transform is None:
            from .clip_text import teacher_transform

            self._teacher_transform = teacher_transform(self.teacher)
        return self._teacher_transform[0]

    @property
    def teacher_preprocess(self) -> dict:
        """The settings that define `teacher_transform` (recorded with everything it embeds)."""
        self.teacher_transform  # noqa: B018 (builds it once)
        return self._teacher_transform[1]

    @torch.inference_mode()
    def encode_teacher(self, pixels: torch.Tensor) -> torch.Tensor:
        """Teacher-preprocessed pixels → the CLIP image embedding, float32, L2-normalised, on CPU."""
        autocast = contextlib.nullcontext() if self.teacher_dtype == torch.float32 else \
            torch.autocast(self.device.type, dtype=self.teacher_dtype)
        with autocast:
            out = self.teacher.encode_image(pixels.to(self.device, non_blocking=True))
        return F.normalize(out.float(), dim=-1).cpu()

    @property
    def teacher_dtype(self) -> torch.dtype:
        """What the teacher's image tower runs in: the model's dtype, but fp32 on a CPU. Under CPU bf16 autocast,
        PyTorch runs a linear layer on the non-contiguous input of open_clip's batch-first attention as a bmm with
        the weight copied for every image: a fixed cost of seconds per batch of two or more images, where fp32 is
        linear in the batch and no slower for a full one (docs/upstream/pytorch-cpu-bf16-linear-bmm.md)."""
        return torch.float32 if self.device.type == "cpu" else self.dtype

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Each text is tokenised as its first TEXT_CHARS_PER_TOKEN × context_length characters (see there)."""
        self._require("tokenizer")
        if isinstance(texts, str):
            texts = [texts]
        elif isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
            raise UserError(f"texts must be a string or a list of strings, not {type(texts).__name__}")
        texts = list(texts)
        wrong = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if wrong:
            raise UserError(f"texts must be strings, got a {wrong[0]}")
        return self.tokenizer([t[:self.text_limit] for t in texts])

    @property
    def text_limit(self) -> int:
        """How many characters of a text are read (see TEXT_CHARS_PER_TOKEN): a longer one is cut there."""
        self._require("tokenizer")
        return TEXT_CHARS_PER_TOKEN * (getattr(self.tokenizer, "context_length", None) or 77)

    def encode_text(self, texts: str | Sequence[str], batch_size: int | None = None,
                    progress: bool = False) -> torch.Tensor:
        """Texts → float32 L2-normalised [N, D] on CPU."""
        return self.encode_tokens(self.tokenize(texts), batch_size, progress)

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor, batch_size: int | None = None,
                      progress: bool = False) -> torch.Tensor:
        """Token ids [N, L] (from `tokenizer`) → float32 L2-normalised [N, D] on CPU. Processed in order of
        token length (each batch stops at its longest caption) and returned in input order."""
        self._require("text_encoder")
        tokens = tokens.cpu()
        if len(tokens) == 0:
            return torch.empty(0, self.embed_dim)
        order = torch.argsort(tokens.argmax(dim=-1), stable=True)
        bs = batch_size or max(self.batch_size, 256)
        starts = range(0, len(order), bs)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="encode texts", unit="batch")
        out = torch.empty(len(tokens), self.embed_dim)
        for i in starts:
            idx = order[i:i + bs]
            with self.autocast():
                feats = self.text_encoder(tokens[idx].to(self.device))
            out[idx] = F.normalize(feats.float(), dim=-1).cpu()
        return out



class DinoV2Clip(nn.Module):
    """Encoders ∘ projector: images through DINOv2 and the projector, texts through CLIP, into one
    L2-normalised space. It holds the two units (`encoders`, `projector`); its identity, `fingerprint`,
    covers both.

    Build it with `dinov2clip.load(...)`; `__init__` only assembles already-loaded parts."""

    def __init__(self, config: ModelConfig, encoders: Encoders, projector: nn.Module):
        super().__init__()
        self.config = config
        self.encoders = encoders
        self.projector = projector.to(encoders.device).eval()

    @property
    def embed_dim(self) -> int:
        return self.projector.config.output_dim

    @property
    def fingerprint(self) -> str:
        return identity.model(self.config, self.projector.sha256)

    @torch.inference_mode()
    def project(self, dinov2_embedding: torch.Tensor | np.ndarray) -> torch.Tensor:
        """DINOv2 embedding (this model's pooling and source) → L2-normalised CLIP-space embedding.
        The projector runs in fp32: it is <1% of the compute and keeps outputs close to reference."""
        x = torch.as_tensor(dinov2_embedding, dtype=torch.float32, device=self.device)
        if x.shape[-1] != self.projector.config.input_dim:
            raise UserError(f"DINOv2 embedding has dimension {x.shape[-1]}, the projector takes "
                            f"{self.projector.config.input_dim}")
        return F.normalize(self.projector(x).float(), dim=-1)

    def encode_image(self, images: ImageInput | Sequence[ImageInput] | torch.Tensor, batch_size: int | None = None,
                     return_dinov2: bool = False, progress: bool = False):
        """Images (PIL of any mode, paths, bytes, or preprocessed tensors) → float32 L2-normalised [N, D] on CPU.

        With `return_dinov2=True` also returns the projector's input (the pooled DINOv2 embedding)
        from the same forward pass. An unreadable image raises `ImageError` (an `OSError`)."""
        outs, dinos = [], []
        batches = _pixel_batches(self.preprocess, images, batch_size or self.batch_size)
        if progress:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc="encode images", unit="batch")
        for pixels in batches:
            dino = self.encode_dinov2(pixels)
            outs.append(self.project(dino).cpu())
            if return_dinov2:
                dinos.append(dino.cpu())
        emb = torch.cat(outs) if outs else torch.empty(0, self.embed_dim)
        if return_dinov2:
            return emb, (torch.cat(dinos) if dinos else torch.empty(0, self.projector.config.input_dim))
        return emb

    def heatmap(self, images, text: str, **options) -> list:
        """Where each image matches `text`: one float32 2-D map per image in its own coordinates (dinov2clip.heatmap)."""
        from .heatmap import heatmaps

        return heatmaps(self, images, text, **options)

    def extra_repr(self) -> str:
        d, c = self.config.dinov2, self.config.clip
        return (f"dinov2={d.get('origin') or d['source']}, pooling={d['pooling']}, clip={c['model_name']}/"
                f"{c.get('pretrained')}, embed_dim={self.embed_dim}, device={self.device}, dtype={self.dtype}")


# What a model answers through its encoders, unchanged (one meaning per name: no override).
for _name in ("image_encoder", "text_encoder", "tokenizer", "preprocess", "device", "dtype", "batch_size",
              "autocast", "encode_dinov2", "teacher", "teacher_transform", "teacher_preprocess", "teacher_dtype",
              "encode_teacher", "tokenize", "text_limit", "encode_text", "encode_tokens", "encoder_fingerprint",
              "dinov2_provenance"):
    setattr(DinoV2Clip, _name, property(lambda self, _n=_name: getattr(self.encoders, _n)))


def _pixel_batches(preprocess, images, batch_size: int):
    if torch.is_tensor(images):
        images = images.unsqueeze(0) if images.ndim == 3 else images
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
        return
    if isinstance(images, (str, os.PathLike, bytes)) or not isinstance(images, Sequence):
        images = [images]
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        yield torch.stack([x if torch.is_tensor(x) else preprocess(x) for x in chunk])

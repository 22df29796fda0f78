"""The all_clip loader for `dinov2clip[:SOURCE]`: returns (model, preprocess, tokenizer)."""
from __future__ import annotations

import sys

import torch

from dinov2clip import DEFAULT_PRESET, UserError, load


class DinoV2ClipWrapper(torch.nn.Module):
    """What clip-retrieval calls: `encode_image(pixels)` and `encode_text(tokens)` → [B, D] tensors.

    Outputs are ordinary tensors (not inference-mode ones), because clip-retrieval normalises them in place."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels).clone().to(pixels.device)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_tokens(tokens).clone().to(tokens.device)


def parse_source(spec: str) -> str:
    """'' → default preset; ':SOURCE' → SOURCE (preset, model directory or hf-hub:org/repo)."""
    if spec == "":
        return DEFAULT_PRESET
    if spec.startswith(":") and len(spec) > 1:
        return spec[1:]
    raise UserError(f"clip_model must be 'dinov2clip' or 'dinov2clip:SOURCE', got 'dinov2clip{spec}'")


def load_dinov2clip(clip_model: str, use_jit: bool = True, device: str = "cpu", clip_cache_path=None):
    """`use_jit` and `clip_cache_path` are clip-retrieval options for OpenAI models; ignored here."""
    try:
        model = load(parse_source(clip_model), device=device)
    except UserError as e:
        # One line and a clean exit: never let all_clip fall through to another loader.
        print(f"dinov2clip: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return DinoV2ClipWrapper(model), model.preprocess, model.tokenizer

"""Named presets: data, not code. `load("reference")` resolves one of these.

Other DINOv2 sizes and teachers are named with the aliases in `dinov2.DINOV2_ALIASES`
(small/base/large/giant, `-reg` for registers) and `clip_text.TEACHER_ALIASES` (B/32, B/16, L/14),
combined with a projector from a path, URL or `hf-hub:` repo via `dinov2clip.from_parts`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

REFERENCE_URL = "https://internalshare.s3.amazonaws.com/dinov2_alignment_model_epoch_16.pt"


@dataclass(frozen=True)
class Preset:
    dinov2: str
    pooling: str
    clip_model: str
    clip_pretrained: str
    projector: str  # path, http(s) URL or hf-hub:org/repo[/file]
    input_dim: int
    hidden_dim: int
    num_blocks: int
    output_dim: int
    license: str
    origin: str
    verified: bool  # False: weights never checked by us (unreachable from where we build)
    notes: str = ""
    # Pins, recorded only where known (never guessed): None loads the hub's current DINOv2 and accepts any
    # projector weights; a value is checked on load (the projector's tensor_sha256, as in a model directory).
    dinov2_revision: str | None = None
    projector_tensor_sha256: str | None = None


PRESETS: dict[str, Preset] = {
    "reference": Preset(
        dinov2="facebook/dinov2-base",
        pooling="mean",
        clip_model="ViT-B-16-quickgelu",
        clip_pretrained="openai",
        projector=REFERENCE_URL,
        input_dim=768,
        hidden_dim=2048,
        num_blocks=6,
        output_dim=512,
        license="unknown: the reference repository publishes no licence; we link, never mirror",
        origin="github.com/SonicCodes/dinov2-clip (epoch 16, unit-norm MSE, 8M CC12M pairs)",
        verified=False,
        notes="Projector URL not verified by dinov2clip: if it is unreachable, train one with "
              "`python -m training.run` or pass projector=PATH.",
        dinov2_revision=None,  # unknown: never fetched where we build
        projector_tensor_sha256=None,  # unknown: the URL was unreachable from where we build
    ),
}
DEFAULT_PRESET = "reference"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}: known presets are {', '.join(sorted(PRESETS))}; "
                        "give a model directory as a path (./my-model) or a hub repo as hf-hub:org/repo") from None


def list_presets() -> list[str]:
    return sorted(PRESETS)

"""DINOv2 image tower (transformers) and the pooling that defines "the DINOv2 embedding"."""
from __future__ import annotations

import torch
from torch import nn

from .errors import UserError, first_line

POOLINGS = ("mean", "cls", "cls+mean")

# Short names users can type instead of hub ids.
DINOV2_ALIASES = {
    **{size: f"facebook/dinov2-{size}" for size in ("small", "base", "large", "giant")},
    **{f"{size}-reg": f"facebook/dinov2-with-registers-{size}" for size in ("small", "base", "large", "giant")},
}


def resolve_dinov2_source(name: str) -> str:
    return DINOV2_ALIASES.get(name, name)


def pooled_dim(hidden_size: int, pooling: str) -> int:
    check_pooling(pooling)
    return 2 * hidden_size if pooling == "cls+mean" else hidden_size


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise UserError(f"unknown pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")


def pool(cls: torch.Tensor, patch_mean: torch.Tensor | None, pooling: str, num_patches: int) -> torch.Tensor:
    """The one pooling: a DINOv2 embedding from its CLS token and the mean of its patch tokens (registers
    excluded). `mean` averages CLS and patches, the reference projector's input."""
    check_pooling(pooling)
    if pooling == "cls":
        return cls
    mean = (cls + num_patches * patch_mean) / (1 + num_patches)
    return mean if pooling == "mean" else torch.cat([cls, mean], dim=-1)


class DinoV2Encoder(nn.Module):
    """pixel_values [B, 3, H, W] → pooled DINOv2 embedding [B, D]. `tokens` and `features` are its public
    parts: whoever needs patches or another pooling calls them instead of reaching into `backbone`."""

    def __init__(self, backbone: nn.Module, pooling: str):
        super().__init__()
        check_pooling(pooling)
        self.backbone = backbone
        self.pooling = pooling
        self.kind = type(backbone).__name__
        self.num_register_tokens = int(getattr(backbone.config, "num_register_tokens", 0) or 0)
        self.patch_size = int(backbone.config.patch_size)
        self.hidden_size = int(backbone.config.hidden_size)
        self.output_dim = pooled_dim(self.hidden_size, pooling)

    def tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (CLS [B, H], patch tokens [B, P, H]) of the last, layer-normed layer; registers dropped. The
        patches are in row-major order over a (height / patch_size) × (width / patch_size) grid."""
        tokens = self.backbone(pixel_values=pixel_values).last_hidden_state
        return tokens[:, 0], tokens[:, 1 + self.num_register_tokens:]

    def features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """→ (CLS [B, H], patch mean [B, H], number of patches): every pooling is `pool` of these."""
        cls, patches = self.tokens(pixel_values)
        return cls, patches.mean(dim=1), patches.shape[1]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cls, patch_mean, num_patches = self.features(pixel_values)
        return pool(cls, patch_mean, self.pooling, num_patches)

def load_dinov2_backbone(source: str, revision: str | None = None, state_dict: dict | None = None,
                         config_json: dict | None = None) -> nn.Module:
    """Load a DINOv2 (or DINOv2-with-registers) backbone from a hub id or a local directory. Its weights are read
    into memory (`state_dict`, when the caller has read and verified them already, or the source's safetensors
    files): transformers would otherwise memory-map them, and a mapped file overwritten later changes the model,
    truncated it crashes it. `config_json`: its config.json, when the caller has read and verified it already
    (the file is not read again). Only safetensors weights load (never a pickle)."""
    from transformers import CONFIG_MAPPING, MODEL_MAPPING, AutoConfig

    try:
        if config_json is not None:
            kind = config_json.get("model_type")
            if kind not in CONFIG_MAPPING:
                raise UserError(f"{source!r}: its config.json names no DINOv2 model_type ({kind!r})")
            config = CONFIG_MAPPING[kind].from_dict(config_json)
        else:
            config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=False)
    except OSError as e:
        raise UserError(f"cannot load DINOv2 config from {source!r}: {first_line(e)}") from None
    if config.model_type not in ("dinov2", "dinov2_with_registers"):
        raise UserError(f"{source!r} is a {config.model_type!r} model, not DINOv2")
    if state_dict is None:
        state_dict = _read_safetensors(source, revision)
    # transformers takes weights given in memory only without a name to read them from
    model, info = MODEL_MAPPING[type(config)].from_pretrained(
        None, config=config, state_dict=state_dict, attn_implementation="sdpa", output_loading_info=True)
    wrong = sorted({*info["missing_keys"], *info["unexpected_keys"], *(str(k) for k in info["mismatched_keys"])})
    if wrong:
        raise UserError(f"the DINOv2 weights in {source} do not fit its config.json: {', '.join(wrong[:3])}")
    return model.eval()


def _read_safetensors(source: str, revision: str | None) -> dict:
    """The source's safetensors weights, read into memory: a local folder's, or a hub repo's (downloaded into
    huggingface_hub's cache first, or found there offline)."""
    from pathlib import Path

    from safetensors.torch import load

    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source, revision=revision, allow_patterns=["*.safetensors"]))
        except Exception as e:  # offline and not cached, unknown repo, no network: one line
            raise UserError(f"cannot load DINOv2 weights from {source!r}: {first_line(e)}") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{source!r} has no safetensors weights (other formats are never loaded)")
    state_dict = {}
    for f in files:
        state_dict.update(load(f.read_bytes()))
    return state_dict

"""CLIP teacher towers through open_clip, and a faster exact text encoder.

OpenAI weights need the QuickGELU model names: open_clip builds GELU for `ViT-B-16` + `openai`
and only warns, which would silently change every text embedding. We refuse that pairing.
"""
from __future__ import annotations

import inspect
import json
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import UserError, first_line

# Short names for the OpenAI teachers, each mapped to its QuickGELU architecture.
TEACHER_ALIASES = {
    "B/32": ("ViT-B-32-quickgelu", "openai"),
    "B/16": ("ViT-B-16-quickgelu", "openai"),
    "L/14": ("ViT-L-14-quickgelu", "openai"),
}

CLIP_CONFIG_FILE = "open_clip_config.json"
CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"


def resolve_teacher(name: str, pretrained: str | None) -> tuple[str, str | None]:
    if name in TEACHER_ALIASES:
        return TEACHER_ALIASES[name]
    return name, pretrained


def check_quickgelu(model_name: str, pretrained: str | None) -> None:
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    model_cfg = open_clip.get_model_config(model_name) or {}
    if tag_cfg and tag_cfg.get("quick_gelu", False) != model_cfg.get("quick_gelu", False):
        hint = f"{model_name}-quickgelu" if tag_cfg.get("quick_gelu") else model_name.replace("-quickgelu", "")
        raise UserError(f"open_clip model {model_name!r} does not match the activation of pretrained "
                        f"{pretrained!r} weights (QuickGELU): use {hint!r}")


def load_clip(model_name: str, pretrained: str | None = None, root: Path | None = None,
              data: bytes | None = None, saved: dict | None = None) -> tuple[nn.Module, object]:
    """Return (open_clip CLIP model, tokenizer).

    `model_name` is an open_clip name with a pretrained tag or file, or — when `root` is given — a
    bundled directory holding `open_clip_config.json` + `open_clip_model.safetensors` (`data`: the weight
    file's bytes, `saved` its config's contents, already read and checked)."""
    import open_clip

    if root is not None:
        return _load_bundled_clip(root, data, saved)
    if open_clip.get_model_config(model_name) is None and not model_name.startswith("hf-hub:"):
        raise UserError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
    check_quickgelu(model_name, pretrained)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*QuickGELU mismatch.*")
            model = open_clip.create_model(model_name, pretrained=pretrained)
    except RuntimeError as e:
        raise UserError(f"cannot load CLIP {model_name!r} pretrained {pretrained!r}: "
                        f"{first_line(e)}") from None
    return model.eval(), open_clip.get_tokenizer(model_name)


# A Hugging Face hub id: `name` or `org/name`. Anything else (a path, `..`, `~`) could point transformers at a
# folder whose configuration names code to run.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def read_bundled_cfg(root: Path, saved: dict | None = None) -> dict:
    """A bundled `open_clip_config.json` (`saved`: its contents, when the caller has read and verified them), refused
    where its text tower or tokenizer would be read from a local folder (transformers looks for a folder of that
    name first): nothing in or near a model directory runs."""
    where = root / CLIP_CONFIG_FILE
    saved = json.loads(where.read_text()) if saved is None else saved
    text_cfg = saved.get("model_cfg", {}).get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        name = text_cfg.get(key)
        if name is not None and (not isinstance(name, str) or not _HUB_ID.fullmatch(name) or ".." in name
                                 or Path(name).exists()):
            raise UserError(f"{where}: text_cfg.{key} {name!r} is not a Hugging Face hub id: refusing to load it")
    return saved


def _load_bundled_clip(root: Path, data: bytes | None = None, saved: dict | None = None):
    """Build from a config dict directly: works on open_clip 2.x (no `local-dir:`) and 3.x. The weights are
    read into memory, never memory-mapped: a mapped file overwritten later would change the loaded model."""
    from open_clip.model import CLIP, CustomTextCLIP, set_model_preprocess_cfg
    from safetensors.torch import load

    saved = read_bundled_cfg(root, saved)
    cfg = saved["model_cfg"]
    cls = CustomTextCLIP if cfg.get("custom_text") else CLIP
    model = cls(**{k: v for k, v in cfg.items() if k != "custom_text"})
    model.load_state_dict(load(data if data is not None else (root / CLIP_WEIGHTS_FILE).read_bytes()), strict=True)
    if saved.get("preprocess_cfg"):  # the teacher's own image preprocessing, as open_clip records it
        set_model_preprocess_cfg(model, saved["preprocess_cfg"])
    return model.eval(), tokenizer_from_cfg(cfg)


def _text_skeleton(cfg: dict) -> nn.Module | None:
    """open_clip's own CLIP class built on the meta device (no memory, no random init) with its image tower
    removed: the text side's modules and key names exactly as open_clip defines them. None for custom-text
    models (Hugging Face towers hold buffers the meta device cannot give back)."""
    from open_clip.model import CLIP

    if cfg.get("custom_text"):
        return None
    with torch.device("meta"):
        model = CLIP(**{k: v for k, v in cfg.items() if k != "custom_text"})
    model.visual = None
    return model


def causal_mask(n: int) -> torch.Tensor:
    """open_clip's additive causal attention mask (a non-persistent buffer: not in the weight file)."""
    return torch.full((n, n), float("-inf")).triu_(1)


def read_clip_text(root: Path, saved: dict | None = None) -> tuple[nn.Module, object] | None:
    """The text tower of a bundled CLIP directory and its tokenizer, reading only the text tensors of
    `open_clip_model.safetensors` (a fraction of the file) and never building the image tower: what a
    query-only process (the FiftyOne App server) needs. None where this architecture has no text-only build."""
    cfg = read_bundled_cfg(root, saved)["model_cfg"]
    model = _text_skeleton(cfg)
    if model is None:
        return None
    model.load_state_dict(read_tensors(root / CLIP_WEIGHTS_FILE, list(model.state_dict())), strict=True, assign=True)
    still_meta = [name for name, b in model.named_buffers() if b.is_meta and name != "attn_mask"]
    if still_meta:
        return None
    model.attn_mask = causal_mask(model.positional_embedding.shape[0])
    return model.eval(), tokenizer_from_cfg(cfg)


def read_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Some tensors of a safetensors file, read into memory (safetensors' own readers memory-map the file,
    so overwriting it later would change them and truncating it would crash the process): the header and
    those tensors' bytes are read with plain reads and handed to `safetensors.torch.load` as a smaller file
    of the same format, which checks them as it checks any file."""
    from safetensors.torch import load

    with open(path, "rb") as f:
        try:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        except (ValueError, MemoryError):
            raise UserError(f"{path} is not a safetensors file") from None
        missing = sorted(set(keys) - set(header))
        if missing:
            raise UserError(f"{path} lacks the text weights {missing[:3]} (not this open_clip config)")
        start, blobs, sub = f.tell(), [], {}  # the data follows the header
        offset = 0
        for key in keys:
            begin, end = header[key]["data_offsets"]
            f.seek(start + begin)
            blobs.append(f.read(end - begin))
            sub[key] = {**header[key], "data_offsets": [offset, offset + len(blobs[-1])]}
            offset += len(blobs[-1])
    head = json.dumps(sub).encode()
    try:
        return load(len(head).to_bytes(8, "little") + head + b"".join(blobs))
    except Exception as e:  # a truncated file reads short
        raise UserError(f"{path}: cannot read its tensors ({type(e).__name__})") from None


def text_tensor_sha256(root: Path) -> str | None:
    """`tensor_sha256` of a bundled CLIP's text tensors: what a text-only load verifies, instead of hashing
    the whole weight file. None where there is no text-only build."""
    from .config import tensor_sha256

    loaded = read_clip_text(root)
    return None if loaded is None else tensor_sha256(loaded[0].state_dict())


def tokenizer_from_cfg(cfg: dict):
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    text_cfg = cfg.get("text_cfg", {})
    context_length = text_cfg.get("context_length", 77)
    if text_cfg.get("hf_tokenizer_name"):
        # older open_clip passes no keyword arguments on to transformers (and transformers' default asks first)
        takes = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(HFTokenizer).parameters.values())
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length,
                           **({"trust_remote_code": False} if takes else {}))
    return SimpleTokenizer(context_length=context_length)


def teacher_preprocess_cfg(model: nn.Module) -> dict:
    """The CLIP image tower's own preprocessing (size, mean/std, interpolation, resize mode)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import get_model_preprocess_cfg

    cfg = {"mean": OPENAI_DATASET_MEAN, "std": OPENAI_DATASET_STD, "interpolation": "bicubic",
           "resize_mode": "shortest"}
    cfg.update({k: v for k, v in get_model_preprocess_cfg(model).items() if v is not None})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def teacher_transform(model: nn.Module) -> tuple[object, dict]:
    """open_clip's own evaluation transform for this CLIP's image tower, and the settings that define it."""
    import open_clip
    import torchvision

    cfg = teacher_preprocess_cfg(model)
    cfg.setdefault("size", model.visual.image_size)
    keys = ("mean", "std", "resize_mode", "interpolation", "fill_color")
    transform = open_clip.image_transform(cfg["size"], is_train=False, **{k: cfg[k] for k in keys if k in cfg})
    settings = {**cfg, "versions": {"open_clip": open_clip.__version__, "torchvision": torchvision.__version__}}
    return transform, settings


def save_clip(model: nn.Module, model_cfg: dict, out_dir: Path) -> None:
    """open_clip's hub layout: open_clip_config.json (model_cfg + preprocess_cfg) + safetensors weights."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": teacher_preprocess_cfg(model)}
    (out_dir / CLIP_CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / CLIP_WEIGHTS_FILE))


def store_matmul_weights(clip_model: nn.Module, dtype: torch.dtype) -> None:
    """Keep a text-only CLIP's matmul weights (attention projections, MLP, text projection) in `dtype`, the
    dtype autocast runs them in. Autocast casts fp32 weights again on *every* call (at ViT-B/16 a large share
    of a short query's time: docs/performance.md), so storing them cast once gives the same outputs bit for
    bit, faster, in half the memory. LayerNorms, embeddings and the residual stream stay fp32, as under
    autocast; `ClipTextEncoder` sees the split and runs under autocast to `dtype`. A CLIP with its image tower
    (the teacher) is left as open_clip built it."""
    if dtype not in (torch.bfloat16, torch.float16) or getattr(clip_model, "visual", None) is not None:
        return
    if not hasattr(clip_model, "token_embedding") or clip_model.token_embedding.weight.dtype != torch.float32:
        return  # not open_clip's CLIP text layout, or loaded in reduced precision already (precision=)
    import open_clip

    open_clip.convert_weights_to_lp(clip_model, dtype)  # the Linear layers, attention in_proj, text_projection


class ClipTextEncoder(nn.Module):
    """tokens [B, L] → raw CLIP text features, equal to open_clip's `encode_text`.

    A causal tower pooled at the EOT token never looks past EOT, so each batch can stop at its
    longest sequence instead of the full context: same output, far less compute on short captions."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.clip = clip_model
        pool = getattr(clip_model, "text_pool_type", None)
        self.fast = (
            hasattr(clip_model, "token_embedding")
            and getattr(clip_model, "attn_mask", None) is not None
            and pool == "argmax"
        )
        # Matmul weights stored in a lower dtype than the rest (`store_matmul_weights`): run under autocast to it
        self.weights_dtype = None
        if self.fast:
            stored = next((m.weight.dtype for m in clip_model.transformer.modules() if isinstance(m, nn.Linear)),
                          None)
            if stored is not None and stored != clip_model.token_embedding.weight.dtype:
                self.weights_dtype = stored

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.clip, "text_projection", None)
        if isinstance(proj, nn.Linear):
            return proj.out_features
        return self.clip.text.output_dim if proj is None else proj.shape[1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return self.clip.encode_text(tokens)
        if self.weights_dtype is None:
            return self._encode(tokens)
        with torch.autocast(tokens.device.type, dtype=self.weights_dtype):
            return self._encode(tokens)

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.clip
        length = int(tokens.argmax(dim=-1).max()) + 1  # EOT has the highest token id
        tokens = tokens[:, :length]
        # open_clip's residual dtype: its get_cast_dtype reads it off the MLP weights, which may be stored lower
        cast_dtype = m.token_embedding.weight.dtype if self.weights_dtype else m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype) + m.positional_embedding[:length].to(cast_dtype)
        mask = m.attn_mask[:length, :length]
        # open_clip ≥ 2.24's Transformer takes [B, L, D] and transposes inside when not batch_first;
        # older ones (no `batch_first`) take [L, B, D], as their encode_text permuted
        sequence_first = not hasattr(m.transformer, "batch_first")
        if sequence_first:
            x = x.permute(1, 0, 2)
        x = m.transformer(x, attn_mask=mask)
        if sequence_first:
            x = x.permute(1, 0, 2)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        proj = m.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

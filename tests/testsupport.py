"""Helpers the test modules import (`from testsupport import ...`). They live here, not in conftest.py:
tests/ and tests/fo/ each have a conftest.py, so `from conftest import` would find whichever pytest
imported last."""
import os
import shutil
from pathlib import Path

from PIL import Image

DATA = Path(__file__).parent / "data"


def solid(color, size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


def seed_hub_repo(repo_id: str, files: dict[str, Path]) -> None:
    """Lay files out exactly as huggingface_hub's cache does (refs/main → snapshot), so the real
    download code resolves them with HF_HUB_OFFLINE=1. A directory value is copied as a tree."""
    root = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        if Path(src).is_dir():
            shutil.copytree(src, snapshot / name, dirs_exist_ok=True)
        else:
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, snapshot / name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)


def seed_reference_towers(work: Path) -> dict:
    """The reference preset's towers with random weights, under their real ids: DINOv2 as
    facebook/dinov2-base (base width, 1 layer) and the open_clip `openai` ViT-B/16 file (full size, fp16),
    so `dinov2clip.load_encoders("reference")` resolves them through the real code with HF_HUB_OFFLINE=1.
    No projector is seeded."""
    import open_clip
    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(num_hidden_layers=1)).save_pretrained(work / "dinov2")
    seed_hub_repo("facebook/dinov2-base", {n: work / "dinov2" / n for n in ("config.json", "model.safetensors")})
    clip_model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    save_file({k: v.half().contiguous() for k, v in clip_model.state_dict().items()}, str(work / "clip.safetensors"))
    seed_hub_repo("timm/vit_base_patch16_clip_224.openai", {"open_clip_model.safetensors": work / "clip.safetensors"})
    return {"clip_file": work / "clip.safetensors", "dinov2_dir": work / "dinov2"}

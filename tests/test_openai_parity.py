"""Our text tower vs OpenAI's own `clip` package (clip-anytorch), on the same random OpenAI-format weights."""
import pytest
import torch
import torch.nn.functional as F

import dinov2clip
from dinov2clip.clip_text import save_clip
from dinov2clip.config import ModelConfig
from dinov2clip.modeldir import save_model_dir

import clip  # clip-anytorch, from the [test] extra: a missing package must fail, never skip  # noqa: E402

TEXTS = ["a photo of a dog", "Two people riding bikes down a busy city street at night.", "",
         "word " * 100, "🙂 unicode, punctuation & CAPS!"]
OPENCLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def openai_model():
    torch.manual_seed(0)
    source = clip.model.CLIP(64, 32, 1, 64, 16, 77, 49408, 128, 2, 2)
    with torch.no_grad():  # OpenAI init leaves some tensors at zero/identity; make every weight matter
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    state_dict = {k: v.clone() for k, v in source.state_dict().items()}
    return clip.model.build_model(state_dict).float().eval()  # OpenAI's own loader (casts to fp16 first)


def model_dir_from(openai_model, out, quick_gelu):
    from open_clip.model import CLIP

    cfg = {**OPENCLIP_CFG, "quick_gelu": quick_gelu}
    ours = CLIP(**cfg)
    ours.load_state_dict(openai_model.state_dict(), strict=True)
    tiny = dinov2clip.load(str(dinov2clip.make_tiny(str(out / "tiny"))), dtype="fp32", text=False)
    projector = dinov2clip.ProjectorWithResiduals(tiny.config.projector["input_dim"], 64, 32, 1)
    config = ModelConfig(dinov2={"source": "unused", "pooling": "mean"},
                         clip={"model_name": "openai-format-tiny", "pretrained": None, "path": "clip"},
                         projector={})
    return save_model_dir(config, projector, out / f"m{int(quick_gelu)}",
                          extra=lambda tmp, _: save_clip(ours, cfg, tmp / "clip"))


def test_text_matches_openai_clip_package(openai_model, tmp_path):
    with torch.no_grad():
        expected = F.normalize(openai_model.encode_text(clip.tokenize(TEXTS, truncate=True)).float(), dim=-1)
    ours = dinov2clip.load(str(model_dir_from(openai_model, tmp_path, quick_gelu=True)), image=False,
                           dtype="fp32", device="cpu")
    torch.testing.assert_close(ours.encode_text(TEXTS), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.tokenize(TEXTS), clip.tokenize(TEXTS, truncate=True).long())


def test_plain_gelu_would_differ(openai_model, tmp_path):
    """The trap the QuickGELU names avoid: same weights, GELU activation → different embeddings."""
    with torch.no_grad():
        expected = F.normalize(openai_model.encode_text(clip.tokenize(TEXTS, truncate=True)).float(), dim=-1)
    gelu = dinov2clip.load(str(model_dir_from(openai_model, tmp_path, quick_gelu=False)), image=False,
                           dtype="fp32", device="cpu")
    assert (gelu.encode_text(TEXTS) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-B-32", "ViT-L-14"])
def test_openai_tag_on_gelu_name_is_refused(name):
    with pytest.raises(dinov2clip.UserError, match=f"{name}-quickgelu"):
        dinov2clip.from_parts(dinov2="base", clip=name, pretrained="openai", projector="unused.pt")

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dinov2clip
from dinov2clip import UserError
from dinov2clip.dinov2 import pool

from testsupport import solid

CAPTIONS = [
    "a red circle",
    "two dogs playing on a sandy beach near the water at sunset",
    "A man",
    "a very long caption " + "that keeps going and going " * 20,  # > 77 tokens: truncated
    "",
    "a blue square on a wooden table next to a cup of coffee",
]


def test_encode_image_inputs_agree(tiny_model, image_folder):
    paths = sorted(p for p in image_folder.iterdir() if p.name != "corrupt.jpg")[:4]
    pils = [Image.open(p) for p in paths]
    from_paths = tiny_model.encode_image([str(p) for p in paths])
    from_pils = tiny_model.encode_image(pils, batch_size=3)
    from_tensors = tiny_model.encode_image(torch.stack([tiny_model.preprocess(p) for p in paths]))
    assert from_paths.shape == (4, tiny_model.embed_dim) and from_paths.dtype == torch.float32
    torch.testing.assert_close(from_paths.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(from_paths, from_pils)
    torch.testing.assert_close(from_paths, from_tensors)
    single = tiny_model.encode_image(paths[0])
    torch.testing.assert_close(single, from_paths[:1])


def test_return_dinov2_is_the_projector_input(tiny_model):
    imgs = [solid("red"), solid("blue", (30, 90))]
    emb, dino = tiny_model.encode_image(imgs, return_dinov2=True)
    pixels = torch.stack([tiny_model.preprocess(i) for i in imgs])
    with torch.no_grad():
        tokens = tiny_model.image_encoder.backbone(pixel_values=pixels).last_hidden_state
        expected = tokens.mean(dim=1)  # reference: mean over CLS + patches
        torch.testing.assert_close(dino, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(emb, F.normalize(tiny_model.projector(dino), dim=-1))
    torch.testing.assert_close(tiny_model.project(dino), emb)


def test_encode_text_equals_stock_open_clip(tiny_model):
    clip = tiny_model.text_encoder.clip
    tokens = tiny_model.tokenizer(CAPTIONS)
    with torch.no_grad():
        stock = F.normalize(clip.encode_text(tokens), dim=-1)
    ours = tiny_model.encode_text(CAPTIONS, batch_size=2)  # several length-sorted batches
    assert ours.shape == (len(CAPTIONS), tiny_model.embed_dim)
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny_model.encode_text(CAPTIONS[1]), stock[1:2], atol=1e-5, rtol=0)
    assert tiny_model.encode_text([]).shape == (0, tiny_model.embed_dim)


def test_text_weights_kept_in_the_autocast_dtype_give_the_same_embeddings(tiny_dir):
    fp32 = dinov2clip.load_encoders(str(tiny_dir), image=False, dtype="fp32")
    bf16 = dinov2clip.load_encoders(str(tiny_dir), image=False, dtype="bf16")
    assert fp32.text_encoder.weights_dtype is None and bf16.text_encoder.weights_dtype == torch.bfloat16
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}  # one cached tower per dtype, never shared
    dtypes = {name: p.dtype for name, p in bf16.text_encoder.clip.named_parameters()}
    for name in ("transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.attn.out_proj.weight",
                 "transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.mlp.c_proj.bias",
                 "text_projection"):
        assert dtypes[name] == torch.bfloat16, name  # what autocast runs in bf16 anyway
    for name in ("token_embedding.weight", "positional_embedding", "ln_final.weight",
                 "transformer.resblocks.0.ln_1.weight"):
        assert dtypes[name] == torch.float32, name  # what autocast keeps in fp32

    tokens = fp32.tokenize(CAPTIONS)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        per_call_cast = fp32.text_encoder(tokens)  # autocast casting the fp32 weights on every call
    with torch.inference_mode():
        assert torch.equal(bf16.text_encoder(tokens), per_call_cast)  # enters autocast itself
    ours = bf16.encode_text(CAPTIONS)
    torch.testing.assert_close(ours, fp32.encode_text(CAPTIONS), atol=2e-2, rtol=0)

    # A CLIP kept as the teacher stays as open_clip built it; its texts come out the same
    teacher = dinov2clip.load_encoders(str(tiny_dir), image=False, teacher=True, dtype="bf16")
    assert teacher.text_encoder.weights_dtype is None
    assert {p.dtype for p in teacher.teacher.parameters()} == {torch.float32}
    assert torch.equal(teacher.encode_text(CAPTIONS), bf16.encode_text(CAPTIONS))
    # A model loaded with its projector holds the same stored tower (lazy front-ends load again for a tower)
    model = dinov2clip.load(str(tiny_dir), image=False, dtype="bf16")
    assert model.text_encoder is not bf16.text_encoder and model.text_encoder.clip is bf16.text_encoder.clip
    assert torch.equal(model.encode_text(CAPTIONS), ours)


def test_text_only_load_keeps_no_image_tower(tiny_dir, tiny_model):
    text_only = dinov2clip.load(str(tiny_dir), image=False, dtype="fp32")
    assert text_only.image_encoder is None and text_only.text_encoder.clip.visual is None
    torch.testing.assert_close(text_only.encode_text(CAPTIONS), tiny_model.encode_text(CAPTIONS))
    assert text_only.fingerprint == tiny_model.fingerprint
    with pytest.raises(UserError, match="without its image encoder"):
        text_only.encode_image([solid("red")])


def test_bad_image_raises_oserror(tiny_model, image_folder):
    with pytest.raises(OSError, match="corrupt.jpg"):
        tiny_model.encode_image([image_folder / "img0.jpg", image_folder / "corrupt.jpg"])


def test_bf16_close_to_fp32(tiny_dir, tiny_model):
    bf16 = dinov2clip.load(str(tiny_dir), dtype="bf16")
    imgs = [solid("red"), solid("green"), Image.effect_noise((90, 90), 40)]
    cos = (bf16.encode_image(imgs) * tiny_model.encode_image(imgs)).sum(-1)
    assert bf16.dtype == torch.bfloat16 and cos.min() > 0.99
    assert bf16.encode_image(imgs).dtype == torch.float32


@pytest.mark.parametrize("pooling,registers", [("mean", 0), ("cls", 0), ("cls+mean", 0), ("mean", 4), ("cls+mean", 4)])
def test_pooling_layout(pooling, registers):
    torch.manual_seed(0)
    tokens = torch.randn(2, 1 + registers + 9, 5)
    cls, patches = tokens[:, 0], tokens[:, 1 + registers:]
    mean = torch.cat([cls[:, None], patches], dim=1).mean(dim=1)
    expected = {"mean": mean, "cls": cls, "cls+mean": torch.cat([cls, mean], dim=-1)}[pooling]
    torch.testing.assert_close(pool(cls, patches.mean(dim=1), pooling, patches.shape[1]), expected)


def test_registers_backbone_pools_without_registers(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from dinov2clip.dinov2 import DinoV2Encoder

    torch.manual_seed(0)
    backbone = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, num_register_tokens=4,
        patch_size=14)).eval()
    backbone.save_pretrained(tmp_path / "reg")
    from dinov2clip.dinov2 import load_dinov2_backbone

    enc = DinoV2Encoder(load_dinov2_backbone(str(tmp_path / "reg")), "mean")
    assert enc.num_register_tokens == 4
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = backbone(pixel_values=pixels).last_hidden_state
        assert tokens.shape[1] == 1 + 4 + 256
        expected = torch.cat([tokens[:, :1], tokens[:, 5:]], dim=1).mean(dim=1)
        torch.testing.assert_close(enc(pixels), expected, atol=1e-5, rtol=1e-5)


def test_unknown_pooling_and_dtype():
    with pytest.raises(UserError, match="unknown pooling"):
        dinov2clip.from_parts(pooling="max", projector="x")
    from dinov2clip.model import resolve_dtype

    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("int8", "cpu")
    assert resolve_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)

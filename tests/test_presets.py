"""Presets resolved through the real code paths (transformers, open_clip, our URL cache) with
HF_HUB_OFFLINE=1, after seeding the caches under the preset's own ids with random weights."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dinov2clip
from dinov2clip import UserError
from dinov2clip.presets import PRESETS, REFERENCE_URL
from dinov2clip.sources import url_cache_path

from testsupport import seed_reference_towers, solid

pytestmark = pytest.mark.slow  # real-size ViT-B/16 and reference projector (random weights)
PRETRAINED_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's, from open_clip's `openai` tag
CAPTIONS = ["a dog on a beach", "a red circle", "two people riding bikes down a busy city street at night"]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """DINOv2 under facebook/dinov2-base (base width, 1 layer), the open_clip `openai` ViT-B/16 file,
    and a reference-format projector in our URL cache."""
    work = tmp_path_factory.mktemp("seed")
    towers = seed_reference_towers(work)
    projector = dinov2clip.ProjectorWithResiduals(768, 512, 2048, 6)
    ckpt = url_cache_path(REFERENCE_URL)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in projector.state_dict().items()}, ckpt)
    yield {"ckpt": ckpt, **towers}
    ckpt.unlink()


@pytest.fixture(scope="module")
def reference(seeded):
    return dinov2clip.load("reference", device="cpu", dtype="fp32")


def test_reference_preset_data():
    p = PRESETS["reference"]
    assert (p.dinov2, p.pooling, p.clip_model, p.clip_pretrained) == \
        ("facebook/dinov2-base", "mean", "ViT-B-16-quickgelu", "openai")
    assert (p.input_dim, p.hidden_dim, p.num_blocks, p.output_dim) == (768, 2048, 6, 512)
    assert p.projector == "https://internalshare.s3.amazonaws.com/dinov2_alignment_model_epoch_16.pt"
    assert not p.verified and "unverified" not in p.license  # verification status is a field, not prose


def test_reference_preset_loads_offline_and_matches_manual_pipeline(seeded, reference):
    import open_clip
    from transformers import Dinov2Model

    assert reference.embed_dim == 512 and reference.encoders.found_config().clip["quick_gelu"]
    assert "quick_gelu" not in reference.config.clip  # what the build found goes to the built object
    imgs = [solid("red"), solid("navy", (120, 300))]
    ours = reference.encode_image(imgs)
    backbone = Dinov2Model.from_pretrained(str(seeded["dinov2_dir"])).eval()
    projector = dinov2clip.load_projector(seeded["ckpt"])
    with torch.no_grad():
        pixels = torch.stack([reference.preprocess(i) for i in imgs])
        expected = F.normalize(projector(backbone(pixel_values=pixels).last_hidden_state.mean(1)), dim=-1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)

    stock = open_clip.create_model("ViT-B-16-quickgelu", pretrained=str(seeded["clip_file"])).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-16-quickgelu")
    with torch.no_grad():
        expected_text = F.normalize(stock.encode_text(tokenizer(CAPTIONS)), dim=-1)
    torch.testing.assert_close(reference.encode_text(CAPTIONS), expected_text, atol=1e-5, rtol=0)


def test_parts_aliases_give_the_same_model(seeded, reference):
    parts = dinov2clip.from_parts(dinov2="base", pooling="mean", clip="B/16", projector=str(seeded["ckpt"]),
                                  device="cpu", dtype="fp32", image=False)
    assert parts.fingerprint == reference.fingerprint
    torch.testing.assert_close(parts.encode_text(CAPTIONS), reference.encode_text(CAPTIONS))


def test_convert_reference_cli_gives_same_embedding_space(seeded, reference, tmp_path):
    out = tmp_path / "converted"
    cmd = [sys.executable, "-m", "dinov2clip", "convert-reference", str(seeded["ckpt"]), str(out),
           "--dinov2", "facebook/dinov2-base", "--pooling", "mean", "--clip", "ViT-B-16-quickgelu",
           "--pretrained", "openai"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    converted = dinov2clip.load(str(out), device="cpu", dtype="fp32")
    assert converted.fingerprint == reference.fingerprint
    img = [solid("green")]
    torch.testing.assert_close(converted.encode_image(img), reference.encode_image(img))
    # a mismatched teacher is caught by the dims check, before anything is written
    bad = subprocess.run(cmd[:5] + [str(tmp_path / "bad")] + cmd[6:-4] + ["--clip", "L/14"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "768" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_bundle_of_preset_is_self_contained(seeded, reference, tmp_path):
    out = dinov2clip.bundle("reference", str(tmp_path / "bundled"))
    assert {p.name for p in out.iterdir()} >= {"config.json", "projector.safetensors", "dinov2", "clip"}
    hub = Path(os.environ["HF_HUB_CACHE"])
    hidden = hub.with_name("hub-hidden")
    hub.rename(hidden)  # nothing may come from the caches now
    try:
        bundled = dinov2clip.load(str(out), device="cpu", dtype="fp32", teacher=True)
        assert bundled.fingerprint == reference.fingerprint
        from open_clip.model import get_model_preprocess_cfg  # the teacher's own preprocessing travels along

        teacher_cfg = get_model_preprocess_cfg(bundled.text_encoder.clip)
        assert tuple(teacher_cfg["mean"]) == PRETRAINED_MEAN and list(teacher_cfg["size"]) == [224, 224]
        img = [solid("orange")]
        torch.testing.assert_close(bundled.encode_image(img), reference.encode_image(img))
        torch.testing.assert_close(bundled.encode_text(CAPTIONS), reference.encode_text(CAPTIONS))
    finally:
        hidden.rename(hub)


def test_unreachable_projector_names_url_and_remedy(seeded):
    seeded["ckpt"].rename(seeded["ckpt"].with_suffix(".away"))
    try:
        with pytest.raises(UserError) as err:
            dinov2clip.load("reference", text=False)
    finally:
        seeded["ckpt"].with_suffix(".away").rename(seeded["ckpt"])
    msg = str(err.value)
    assert REFERENCE_URL in msg and "training.run" in msg and "projector=PATH" in msg and "\n" not in msg


def test_preset_pins_are_checked_on_load(seeded, monkeypatch):
    """A preset's recorded sha256 and revision reach the config; the projector's is checked on load (the loaded
    unit says its hash). The reference records neither: both are unknown to us (never fetched where we build), so none is guessed."""
    from dataclasses import replace

    from dinov2clip.factory import resolve_source

    assert PRESETS["reference"].dinov2_revision is None and PRESETS["reference"].projector_tensor_sha256 is None
    good = dinov2clip.load("reference", text=False, device="cpu", dtype="fp32").projector.sha256
    monkeypatch.setitem(PRESETS, "pinned", replace(PRESETS["reference"], projector_tensor_sha256=good))
    assert dinov2clip.load("pinned", text=False, device="cpu", dtype="fp32").projector.sha256 == good
    monkeypatch.setitem(PRESETS, "pinned", replace(PRESETS["reference"], projector_tensor_sha256="0" * 64,
                                                   dinov2_revision="main"))
    assert resolve_source("pinned")[0].dinov2["revision"] == "main"
    with pytest.raises(UserError, match="differ from the tensor_sha256"):
        dinov2clip.load("pinned", text=False, device="cpu", dtype="fp32")

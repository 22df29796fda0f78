import pytest

from dinov2clip import UserError, identity
from dinov2clip.hub import model_card, push, upload_files


def test_upload_file_set(tiny_dir):
    (tiny_dir / "scratch.tmp").write_text("x")  # never uploaded
    try:
        files = upload_files(tiny_dir)
    finally:
        (tiny_dir / "scratch.tmp").unlink()
    assert files == sorted([
        "README.md", "clip/open_clip_config.json", "clip/open_clip_model.safetensors", "config.json",
        "dinov2/config.json", "dinov2/model.safetensors", "projector.safetensors",
    ])


def test_model_card(tiny_dir):
    from dinov2clip.config import read_config

    card = model_card(tiny_dir, "acme/tiny")
    cfg = read_config(tiny_dir)
    assert card.startswith("---\nlicense: apache-2.0\n")
    assert 'dinov2clip.load("hf-hub:acme/tiny")' in card
    assert identity.known_model(cfg) in card and "32→64×2→32" in card and "mean pooling" in card
    assert '"seed": 0' in card


def test_push_offline_is_one_line_error(tiny_dir):
    with pytest.raises(UserError, match="cannot push to hf-hub:acme/tiny") as err:
        push(str(tiny_dir), "acme/tiny")
    assert "\n" not in str(err.value)

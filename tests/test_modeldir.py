import json
import shutil

import pytest
import torch

import dinov2clip
from dinov2clip import UserError
from dinov2clip.config import CONFIG_FILE, FORMAT_VERSION, file_sha256

from testsupport import seed_hub_repo, solid


def edit_config(model_dir, **changes):
    path = model_dir / CONFIG_FILE
    cfg = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(json.dumps(cfg))


@pytest.fixture
def copy_of_tiny(tiny_dir, tmp_path):
    return shutil.copytree(tiny_dir, tmp_path / "tiny")


def test_config_records_license_provenance_version_and_hashes(tiny_dir):
    cfg = json.loads((tiny_dir / CONFIG_FILE).read_text())
    assert cfg["format_version"] == FORMAT_VERSION
    assert cfg["license"].startswith("Apache-2.0")
    assert cfg["provenance"]["seed"] == 0
    assert cfg["embed_dim"] == cfg["projector"]["output_dim"] == 32
    assert set(cfg["weights_sha256"]) == {"projector.safetensors", "dinov2/model.safetensors",
                                          "clip/open_clip_model.safetensors", "dinov2/config.json",
                                          "clip/open_clip_config.json"}
    for rel, digest in cfg["weights_sha256"].items():
        assert file_sha256(tiny_dir / rel) == digest
    assert cfg["dinov2"]["path"] == "dinov2" and cfg["clip"]["path"] == "clip"


def test_make_tiny_is_deterministic(tmp_path):
    a = dinov2clip.make_tiny(str(tmp_path / "a"), seed=3)
    b = dinov2clip.make_tiny(str(tmp_path / "b"), seed=3)
    c = dinov2clip.make_tiny(str(tmp_path / "c"), seed=4)
    fp = [dinov2clip.load(str(d), image=False, text=False).fingerprint for d in (a, b, c)]
    assert fp[0] == fp[1] != fp[2]


def test_make_tiny_refuses_non_empty_dir(tiny_dir):
    with pytest.raises(UserError, match="not empty"):
        dinov2clip.make_tiny(str(tiny_dir))


def test_overwrite_replaces_only_a_model_directory(tmp_path):
    """--overwrite replaces a model directory dinov2clip wrote; a folder holding anything else survives."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("irreplaceable")
    with pytest.raises(UserError, match="did not write"):
        dinov2clip.make_tiny(str(mine), overwrite=True)
    assert (mine / "thesis.tex").read_text() == "irreplaceable"
    ours = dinov2clip.make_tiny(str(tmp_path / "ours"), seed=1)
    first = dinov2clip.load(str(ours), image=False, text=False).fingerprint
    dinov2clip.make_tiny(str(ours), seed=2, overwrite=True)
    assert dinov2clip.load(str(ours), image=False, text=False).fingerprint != first
    (ours / "notes.txt").write_text("the user's")
    with pytest.raises(UserError, match="did not write"):
        dinov2clip.make_tiny(str(ours), seed=3, overwrite=True)
    assert (ours / "notes.txt").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "ours"], "temporaries left behind"


def test_bundle_round_trip(tiny_dir, tiny_model, tmp_path):
    out = dinov2clip.bundle(str(tiny_dir), str(tmp_path / "bundle"))
    again = dinov2clip.load(str(out), dtype="fp32")
    assert again.fingerprint == tiny_model.fingerprint
    imgs = [solid("red"), solid("teal")]
    torch.testing.assert_close(again.encode_image(imgs), tiny_model.encode_image(imgs))
    torch.testing.assert_close(again.encode_text(["a cat"]), tiny_model.encode_text(["a cat"]))
    assert not list(tmp_path.glob(".bundle.*")), "temporary directory left behind"


@pytest.mark.parametrize("change,match", [
    ({"format_version": "2.0"}, "format_version 2.0 is not supported"),
    ({"format_version": None}, "format_version"),
    ({"dinov2__path": "/etc"}, "must be relative"),
    ({"clip__path": "../elsewhere"}, "must be relative"),
    ({"projector__tensor_sha256": "0" * 64}, "tensor_sha256"),
    ({"projector__output_dim": 99}, "output_dim"),
])
def test_bad_config_one_line(copy_of_tiny, change, match):
    edit_config(copy_of_tiny, **change)
    with pytest.raises(UserError, match=match) as err:
        dinov2clip.load(str(copy_of_tiny))
    assert "\n" not in str(err.value)


def test_minor_version_bump_still_loads(copy_of_tiny):
    edit_config(copy_of_tiny, format_version="1.7", future_field={"x": 1})
    assert dinov2clip.load(str(copy_of_tiny), text=False).embed_dim == 32


def _flip_byte_of(weights, key: str) -> None:
    """Flip one byte inside tensor `key` of a safetensors file (8-byte header length, JSON header, data)."""
    data = bytearray(weights.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + header_len])[key]["data_offsets"]
    data[8 + header_len + (start + end) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


def test_corrupt_weights_detected(copy_of_tiny):
    """A query-only load checks the text tensors it reads; the teacher (CLIP's image tower) checks the file."""
    weights = copy_of_tiny / "clip" / "open_clip_model.safetensors"
    _flip_byte_of(weights, "visual.conv1.weight")
    dinov2clip.load(str(copy_of_tiny))  # the text tower is intact: text search still works
    with pytest.raises(UserError, match="clip/open_clip_model.safetensors does not match its sha256"):
        dinov2clip.load(str(copy_of_tiny), teacher=True)
    _flip_byte_of(weights, "token_embedding.weight")
    with pytest.raises(UserError, match="CLIP text weights in clip/open_clip_model.safetensors do not match"):
        dinov2clip.load(str(copy_of_tiny))
    projector = copy_of_tiny / "projector.safetensors"
    data = bytearray(projector.read_bytes())
    data[-10] ^= 0xFF
    projector.write_bytes(bytes(data))
    with pytest.raises(UserError, match="projector.safetensors does not match its sha256"):
        dinov2clip.load(str(copy_of_tiny))


def test_missing_directory_and_not_a_model_dir(tmp_path):
    with pytest.raises(UserError, match="model directory not found"):
        dinov2clip.load(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no config.json"):
        dinov2clip.load(str(tmp_path))


def test_projector_dims_must_fit_dinov2(copy_of_tiny):
    projector = dinov2clip.ProjectorWithResiduals(48, 32, 64, 2)
    from dinov2clip.modeldir import write_projector

    write_projector(projector, copy_of_tiny / "projector.safetensors")
    edit_config(copy_of_tiny, projector__input_dim=48, projector__tensor_sha256=None, weights_sha256={})
    with pytest.raises(UserError, match="gives 32-d embeddings; the projector takes 48-d"):
        dinov2clip.load(str(copy_of_tiny))


def test_hf_hub_model_directory_and_projector(tiny_dir, tiny_model):
    seed_hub_repo("acme/tiny-dinov2clip", {".": tiny_dir})
    from_hub = dinov2clip.load("hf-hub:acme/tiny-dinov2clip", dtype="fp32")
    assert from_hub.fingerprint == tiny_model.fingerprint
    torch.testing.assert_close(from_hub.encode_text(["a cat"]), tiny_model.encode_text(["a cat"]))
    seed_hub_repo("acme/just-a-projector", {"weights/p.safetensors": tiny_dir / "projector.safetensors"})
    from dinov2clip.factory import resolve_source

    config, root = resolve_source(str(tiny_dir))
    config.projector = {"source": "hf-hub:acme/just-a-projector/weights/p.safetensors"}
    config.weights_sha256 = {k: v for k, v in config.weights_sha256.items() if k != "projector.safetensors"}
    rebuilt = dinov2clip.factory.build(config, root, dtype="fp32", image=False)
    assert rebuilt.fingerprint == tiny_model.fingerprint
    with pytest.raises(UserError, match="cannot fetch hf-hub:acme/absent"):
        dinov2clip.load("hf-hub:acme/absent")


def test_make_tiny_unknown_size(tmp_path):
    with pytest.raises(UserError, match="unknown size 'huge'"):
        dinov2clip.make_tiny(str(tmp_path / "x"), size="huge")

import io

import numpy as np
import pytest
import torch

import dinov2clip
from dinov2clip import ProjectorWithResiduals, UserError, load_projector
from dinov2clip.modeldir import write_projector

from testsupport import DATA

SEED = DATA / "seed_projector_small.pt"


def seed_output(projector):
    x = torch.from_numpy(np.load(DATA / "seed_projector_small_input.npy"))
    with torch.no_grad():
        return projector(x).numpy()


def test_reproduces_reference_class_output():
    projector = load_projector(SEED)
    assert isinstance(projector, ProjectorWithResiduals)
    expected = np.load(DATA / "seed_projector_small_output.npy")
    np.testing.assert_allclose(seed_output(projector), expected, atol=1e-5, rtol=0)
    # raw output: not unit-norm (normalising is the model's job)
    assert not np.allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-3)


def test_reference_dims_parameter_count():
    assert sum(p.numel() for p in ProjectorWithResiduals(768, 512, 2048, 6).parameters()) == 54_608_384


def _variants():
    sd = torch.load(SEED, weights_only=True)
    yield "plain", sd
    yield "state_dict", {"state_dict": sd, "epoch": 16}
    yield "model_state_dict", {"model_state_dict": {f"module.{k}": v for k, v in sd.items()}, "step": 3}
    yield "compiled", {f"_orig_mod.{k}": v for k, v in sd.items()}
    yield "ddp+compiled", {f"module._orig_mod.{k}": v for k, v in sd.items()}
    yield "fp16", {k: v.half() for k, v in sd.items()}


@pytest.mark.parametrize("name,obj", list(_variants()), ids=[n for n, _ in _variants()])
def test_tolerates_wrappers_prefixes_and_fp16(tmp_path, name, obj):
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    out = seed_output(load_projector(path))
    tol = 2e-2 if name == "fp16" else 1e-5
    np.testing.assert_allclose(out, np.load(DATA / "seed_projector_small_output.npy"), atol=tol)


def test_safetensors_and_model_directory(tmp_path):
    projector = load_projector(SEED)
    write_projector(projector, tmp_path / "projector.safetensors")
    expected = seed_output(projector)
    np.testing.assert_array_equal(seed_output(load_projector(tmp_path / "projector.safetensors")), expected)
    np.testing.assert_array_equal(seed_output(load_projector(tmp_path)), expected)  # a model directory


class NotAllowed:
    pass


@pytest.mark.parametrize("content,match", [
    (lambda p: torch.save({"state_dict": {"foo": torch.zeros(1)}}, p), "no projector weights"),
    (lambda p: torch.save({"x": NotAllowed()}, p), "weights_only=True"),
    (lambda p: p.write_bytes(b"garbage"), "cannot read projector checkpoint"),
    (lambda p: None, "not found"),
])
def test_bad_checkpoints_give_one_line(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    content(path)
    with pytest.raises(UserError, match=match) as err:
        load_projector(path)
    assert "\n" not in str(err.value)


def test_dims_read_from_checkpoint():
    projector = ProjectorWithResiduals(20, 10, 16, 3)
    buf = io.BytesIO()
    torch.save(projector.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    from dinov2clip.projector import infer_config

    assert infer_config(sd).to_dict() == {"input_dim": 20, "output_dim": 10, "hidden_dim": 16, "num_blocks": 3}
    assert dinov2clip.projector.projector_from_state_dict(sd).config.num_blocks == 3

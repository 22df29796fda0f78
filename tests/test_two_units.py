"""Encoders and projector as two units (DESIGN §2a): encoders load without any projector, a projector is
refused on encoders it was not trained for, precomputed data carries the encoder fingerprint and is never
mixed, reruns never return results of another config, and a preset name never means a folder by accident."""
import json
import os
import shutil
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch

import dinov2clip
from dinov2clip import identity
from dinov2clip.errors import UserError

pytest.importorskip("yaml", reason="the pipeline reads YAML configs (the [train] extra)")
pytest.importorskip("braceexpand", reason="shard lists use brace patterns (the [train] extra)")
from training import precompute as pc  # noqa: E402
from training import shards as fmt  # noqa: E402
from training.data import EmbeddingSet  # noqa: E402
from training.synthetic import write_shapes_shards  # noqa: E402
from training.train import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "training" / "configs" / "tiny.yaml"


def cli(module, *args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=timeout)


def one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """A tiny model with the same dims as `tiny_dir` but other encoders (other random towers)."""
    return dinov2clip.make_tiny(str(tmp_path_factory.mktemp("other") / "tiny1"), seed=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shapes_shards(tmp_path_factory.mktemp("wds"), 48, per_shard=12, seed=3)


def precompute(model, shards, out):
    return pc.precompute(str(model), [str(p) for p in shards], out, batch_size=8, device="cpu", dtype="fp32",
                         workers=1, progress=False)


def test_encoders_load_without_a_projector(tiny_dir, shards, tmp_path):
    """A model directory whose projector file is gone serves as encoders (and precomputes); the full
    model still needs its projector."""
    bare = tmp_path / "no-projector"
    shutil.copytree(tiny_dir, bare)
    (bare / "projector.safetensors").unlink()
    enc = dinov2clip.load_encoders(str(bare), device="cpu", dtype="fp32", teacher=True)
    assert isinstance(enc, dinov2clip.Encoders) and not hasattr(enc, "projector")
    full = dinov2clip.load(str(tiny_dir), device="cpu", dtype="fp32")
    assert enc.encoder_fingerprint == full.encoder_fingerprint != full.fingerprint
    assert enc.encode_text(["a red circle"]).allclose(full.encode_text(["a red circle"]))
    with pytest.raises(UserError, match="projector"):
        dinov2clip.load(str(bare), device="cpu")
    out = tmp_path / "pre"
    proc = cli("training.run", "precompute", "--model", bare, "--shards", *shards[:2], "--out", out, "--device", "cpu",
               "--dtype", "fp32", "--batch-size", "8", "--workers", "1", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(fmt.fingerprints(out)) == [identity.towers(full.config)]


def test_projector_for_other_encoders_is_refused(tiny_dir, other_dir):
    with pytest.raises(UserError, match="trained for encoders") as err:
        dinov2clip.load(str(tiny_dir), projector=str(other_dir), device="cpu")
    theirs = dinov2clip.load_encoders(str(other_dir), image=False, text=False).encoder_fingerprint
    ours = dinov2clip.load_encoders(str(tiny_dir), image=False, text=False).encoder_fingerprint
    assert theirs[:12] in str(err.value) and ours[:12] in str(err.value) and "\n" not in str(err.value)
    # its own projector, given explicitly, pairs
    assert dinov2clip.load(str(tiny_dir), projector=str(tiny_dir), device="cpu").encoder_fingerprint == ours


def test_precompute_refuses_an_out_of_other_encoders(tiny_dir, other_dir, shards, tmp_path):
    out = tmp_path / "pre"
    precompute(tiny_dir, shards, out)
    before = {p.name: (p / fmt.META).read_bytes() for p in (out / "shards").iterdir()}
    a = list(fmt.fingerprints(out))[0]
    b = identity.towers(dinov2clip.load_encoders(str(other_dir), image=False, text=False).config)
    args = ["precompute", "--model", other_dir, "--shards", *shards, "--out", out, "--device", "cpu", "--dtype",
            "fp32", "--batch-size", "8", "--workers", "1", "--quiet"]
    one_line_error(cli("training.run", *args), a[:12], b[:12], "--overwrite")
    assert {p.name: (p / fmt.META).read_bytes() for p in (out / "shards").iterdir()} == before
    proc = cli("training.run", *args, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(fmt.fingerprints(out)) == [b]


def test_train_refuses_mixed_shards_and_splits(tiny_dir, other_dir, shards, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    precompute(tiny_dir, shards, a)
    precompute(other_dir, shards[:2], b)
    mixed = tmp_path / "mixed"
    shutil.copytree(a / "shards" / shards[0].stem, mixed / "shards" / shards[0].stem)
    shutil.copytree(b / "shards" / shards[1].stem, mixed / "shards" / shards[1].stem)
    with pytest.raises(UserError, match="mixes shards of two encoders"):
        EmbeddingSet([mixed], "mean")
    with pytest.raises(UserError, match="mixes shards of two encoders"):
        EmbeddingSet([a, b], "mean")
    cfg = dict(pooling="mean", hidden_dim=16, num_blocks=1, epochs=1, batch_size=12, device="cpu", progress=False)
    with pytest.raises(UserError, match="--val shards come from encoders"):
        train(TrainConfig(train=[str(a)], val=[str(b)], out=str(tmp_path / "run1"), **cfg))
    with pytest.raises(UserError, match="--test shards come from encoders"):
        train(TrainConfig(train=[str(a)], val=[str(a)], test=[str(b)], out=str(tmp_path / "run2"), **cfg))
    with pytest.raises(UserError, match="--model-source"):
        train(TrainConfig(train=[str(a)], val=[str(a)], model_source=str(other_dir), out=str(tmp_path / "run3"), **cfg))
    assert not (tmp_path / "run1" / "checkpoints" / "last.pt").exists()


def test_resume_with_a_changed_config_is_refused(tiny_dir, shards, tmp_path):
    pre = tmp_path / "pre"
    precompute(tiny_dir, shards, pre)
    cfg = dict(train=[str(pre)], val=[str(pre)], out=str(tmp_path / "run"), pooling="mean", hidden_dim=16,
               num_blocks=1, batch_size=12, device="cpu", progress=False, model_source=str(tiny_dir))
    first = train(TrainConfig(epochs=1, **cfg))
    ckpt = torch_load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["encoder_fingerprint"] == list(fmt.fingerprints(pre))[0]
    with pytest.raises(UserError, match=r"changed: epochs 1 → 2"):
        train(TrainConfig(epochs=2, resume=True, **cfg))
    again = train(TrainConfig(**{**cfg, "epochs": 1, "resume": True, "progress": True}))  # how it runs may change
    assert again["selected_epoch"] == first["selected_epoch"] == 1
    exported = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert exported["projector"]["encoder_fingerprint"] == \
        dinov2clip.load_encoders(str(tiny_dir), image=False, text=False).encoder_fingerprint


def torch_load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


SMALL = ["--set", "data.shapes={train: 96, val: 24, test: 24, per_shard: 48, seed: 0, image_size: 32}",
         "--set", "train.epochs=1", "--set", "train.batch_size=24", "--set", "train.hidden_dim=16",
         "--set", "train.num_blocks=1", "--quiet"]


def test_pipeline_rerun_resumes_or_refuses_a_changed_config(tmp_path, monkeypatch):
    from training import synthetic
    from training.pipeline import load_config, run_pipeline

    out = tmp_path / "run"
    first = cli("training.run", "--config", TINY, "--output", out, *SMALL)
    assert first.returncode == 0, first.stderr[-3000:]
    same = cli("training.run", "--config", TINY, "--output", out, *SMALL)
    assert same.returncode == 0 and "training already finished" in same.stdout, same.stderr[-3000:]
    # shards drawn by another version of the drawing code are not resumed as if they were this one's
    monkeypatch.setattr(synthetic, "VERSION", synthetic.VERSION + 1)
    with pytest.raises(UserError, match=r"shapes_version null → 2"):
        run_pipeline(load_config(TINY, SMALL[1::2]), out, progress=False)
    changed = cli("training.run", "--config", TINY, "--output", out, *SMALL, "--set", "train.epochs=2")
    one_line_error(changed, "train.epochs 1 → 2", "--output")
    data = cli("training.run", "--config", TINY, "--output", out, *SMALL[:1],
               "data.shapes={train: 120, val: 24, test: 24, per_shard: 48, seed: 0, image_size: 32}", *SMALL[2:])
    one_line_error(data, "data.shapes.train 96 → 120")


def test_planted_rerun_with_other_sizes_is_refused(tmp_path):
    from support.planted import run_planted

    small = dict(n_eval=200, in_dim=8, out_dim=16, hidden=16, epochs=1, batch_size=40, proj_hidden=16,
                 num_blocks=1, losses=["mse"])
    run_planted(tmp_path, n_train=1000, **small)
    with pytest.raises(UserError, match=r"changed: n_train 1000 → 2000"):
        run_planted(tmp_path, n_train=2000, **small)


def test_a_folder_named_like_a_preset_never_shadows_it(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "reference")
    one_line_error(cli("dinov2clip.cli", "info", "reference", cwd=tmp_path), "both a preset and a path",
                   "./reference", "local-dir:reference")
    for spelled in ("./reference", "local-dir:reference"):
        proc = cli("dinov2clip.cli", "info", spelled, "--json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["directory"] == "reference"
    proc = cli("dinov2clip.cli", "info", "reference", "--json", cwd=tmp_path / "reference")  # no such folder here
    assert proc.returncode == 0 and json.loads(proc.stdout)["directory"] is None, proc.stderr


def _edit_tensor(weights: Path, prefix: str) -> str:
    """Scale the first tensor whose key starts with `prefix`, in place, leaving config.json as it was."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    key = next(k for k in sorted(state) if k.startswith(prefix) and state[k].is_floating_point())
    state[key] = state[key] * 1.5 + 0.01
    save_file(state, str(weights))
    return key


def test_a_text_only_load_reads_only_the_text_tower(tiny_dir, tmp_path, monkeypatch):
    """A query-only load (the App server's) builds no image tower and reads only the text tensors, gives the
    full model's text embeddings exactly, and refuses text weights edited behind config.json's back."""
    import open_clip.model

    from dinov2clip import factory

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    assert json.loads((model_dir / "config.json").read_text())["clip"].get("text_sha256"), "no text hash recorded"
    captions = ["a dog", "a red circle on a blue background, drawn by hand"]
    full = dinov2clip.load_encoders(str(model_dir), image=False, teacher=True, device="cpu", dtype="fp32")
    want = full.encode_text(captions)

    vision_devices = []  # open_clip's skeleton is built on the meta device: shapes only, no memory, no init

    def build_vision(*args, **kwargs):
        tower = real_build(*args, **kwargs)
        vision_devices.append(next(tower.parameters()).device.type)
        return tower

    real_build = open_clip.model._build_vision_tower
    monkeypatch.setattr(open_clip.model, "_build_vision_tower", build_vision)
    factory._TEXT_TOWERS.clear()
    text_only = dinov2clip.load_encoders(str(model_dir), image=False, device="cpu", dtype="fp32")
    assert vision_devices and set(vision_devices) == {"meta"}, f"image tower materialised on {vision_devices}"
    assert text_only.text_encoder.clip.visual is None
    assert torch.equal(text_only.encode_text(captions), want)

    # an edit of the image tower alone: the text tower is intact, so text search still loads; the teacher refuses
    weights = model_dir / "clip" / "open_clip_model.safetensors"
    _edit_tensor(weights, "visual.")
    factory._TEXT_TOWERS.clear()
    assert torch.equal(dinov2clip.load_encoders(str(model_dir), image=False, device="cpu", dtype="fp32")
                       .encode_text(captions), want)
    with pytest.raises(UserError, match="does not match its sha256"):
        dinov2clip.load_encoders(str(model_dir), image=False, teacher=True, device="cpu", dtype="fp32")

    # an edit of a text tensor is refused, also when a tower of the old file is still cached in this process
    dinov2clip.load_encoders(str(model_dir), image=False, device="cpu", dtype="fp32")
    time.sleep(0.01)  # a new mtime even on coarse-grained file systems
    _edit_tensor(weights, "transformer.")
    with pytest.raises(UserError, match="CLIP text weights .* do not match"):
        dinov2clip.load_encoders(str(model_dir), image=False, device="cpu", dtype="fp32")

"""The reference recipe trains a projector from nothing: `python -m training.run --config
training/configs/reference.yaml`, offline, with the reference towers seeded under their real ids (random
weights) and **no projector obtainable anywhere** (the published one is neither cached nor downloadable),
sizes overridden small: precompute → train → eval, ending in a loadable model directory."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dinov2clip

from testsupport import seed_reference_towers

pytest.importorskip("yaml", reason="the pipeline reads YAML configs (the [train] extra)")
pytest.importorskip("braceexpand", reason="shard lists use brace patterns (the [train] extra)")
pytest.importorskip("matplotlib", reason="the eval stage plots with matplotlib (the [train] extra)")
from training.synthetic import COLOURS, SHAPES, shape_image, write_shapes_shards  # noqa: E402

pytestmark = pytest.mark.slow  # real-size ViT-B/16 teacher (random weights)
ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "training" / "configs" / "reference.yaml"


def run(*args, env, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "training.run", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=1200)


def test_reference_recipe_runs_with_no_projector_obtainable(tmp_path):
    seed_reference_towers(tmp_path / "seed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "DINOV2CLIP_CACHE": str(tmp_path / "empty-cache")}  # the reference projector is nowhere
    data = tmp_path / "shards"
    splits = {s: write_shapes_shards(data / s, n, per_shard=16, seed=i, prefix=s)
              for i, (s, n) in enumerate((("train", 48), ("val", 16), ("test", 16)))}
    out = tmp_path / "run"
    overrides = [f"data.{s}={json.dumps([str(p) for p in paths])}" for s, paths in splits.items()]
    overrides += ["precompute.batch_size=16", "precompute.workers=1", "precompute.device=cpu", "precompute.dtype=fp32",
                  "train.hidden_dim=32", "train.num_blocks=1", "train.epochs=2", "train.batch_size=16",
                  "train.device=cpu", "train.cpu_threads=1"]
    proc = run("--config", REFERENCE, "--output", out, "--quiet", *[a for o in overrides for a in ("--set", o)], env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    model_dir = out / "train" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["dinov2"]["source"] == "facebook/dinov2-base" and config["clip"]["model_name"] == "ViT-B-16-quickgelu"
    assert (config["projector"]["input_dim"], config["projector"]["hidden_dim"]) == (768, 32)

    # eval of the trained model: its teacher is the reference CLIP, loaded with the encoders only
    images = tmp_path / "eval-images"
    images.mkdir()
    import numpy as np

    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        colour, shape = list(COLOURS)[i], SHAPES[i % len(SHAPES)]
        shape_image(rng, colour, shape, 64).save(images / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a {colour} {shape}"})
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    proc = run("eval", "--model", model_dir, "--folder", images, "--captions", tmp_path / "captions.csv",
               "--out", tmp_path / "eval", "--no-cache", "--device", "cpu", "--dtype", "fp32", "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [r["name"] for r in report["rows"][:2]] == ["dinov2clip", "CLIP"]
    assert report["teacher"]["origin"] == "ViT-B-16-quickgelu/openai"

    # the exported directory loads (with the seeded towers) and pairs with the reference encoders
    os.environ["DINOV2CLIP_CACHE"], saved = env["DINOV2CLIP_CACHE"], os.environ.get("DINOV2CLIP_CACHE")
    try:
        model = dinov2clip.load(str(model_dir), device="cpu", dtype="fp32")
        assert model.encode_text(["a red circle"]).shape == (1, 512)
        assert model.encoder_fingerprint == dinov2clip.load_encoders("reference", image=False, text=False).encoder_fingerprint
        with pytest.raises(dinov2clip.UserError, match="not in the cache"):
            dinov2clip.load("reference", image=False, text=False)  # the published projector stays unobtainable
    finally:
        if saved is None:
            os.environ.pop("DINOV2CLIP_CACHE")
        else:
            os.environ["DINOV2CLIP_CACHE"] = saved

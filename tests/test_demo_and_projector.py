"""What a model can serve: a demo model says so once, and every command line that takes a model takes a
projector too (the way past an unobtainable one)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from dinov2clip.embed import load_embeddings

EXE = Path(sys.executable).with_name("dinov2clip")


def run(*args):
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_a_demo_model_says_what_it_knows_once(tiny_dir, image_folder, tmp_path):
    res = run("embed", image_folder, "--model", tiny_dir, "--out", tmp_path / "e.npz", "--dtype", "fp32")
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "demo model" in notes[0] and "training.run fit" in notes[0]

    real = tmp_path / "not-a-demo"
    shutil.copytree(tiny_dir, real)
    config = json.loads((real / "config.json").read_text())
    del config["provenance"]["demo"]
    (real / "config.json").write_text(json.dumps(config))
    res = run("embed", image_folder, "--model", real, "--out", tmp_path / "f.npz", "--dtype", "fp32")
    assert res.returncode == 0, res.stderr
    assert "demo model" not in res.stderr


def test_embed_and_search_take_a_projector(tiny_dir, image_folder, tmp_path):
    from dinov2clip.modeldir import write_projector
    from dinov2clip.projector import ProjectorWithResiduals

    torch.manual_seed(7)
    other = tmp_path / "other.safetensors"
    write_projector(ProjectorWithResiduals(32, 32, 16, 1), other)
    plain, swapped = tmp_path / "plain.npz", tmp_path / "swapped.npz"
    assert run("embed", image_folder, "--model", tiny_dir, "--out", plain, "--dtype", "fp32").returncode == 0
    res = run("embed", image_folder, "--model", tiny_dir, "--projector", other, "--out", swapped, "--dtype", "fp32")
    assert res.returncode == 0, res.stderr
    a, _, meta_a = load_embeddings(plain)
    b, _, meta_b = load_embeddings(swapped)
    assert meta_b["projector"] == str(other) and meta_a["fingerprint"] != meta_b["fingerprint"]
    assert not np.allclose(a, b)
    found = run("search", swapped, "a red circle", "-k", "2", "--dtype", "fp32")  # the recorded projector
    assert found.returncode == 0 and len(found.stdout.strip().splitlines()) == 2, found.stderr

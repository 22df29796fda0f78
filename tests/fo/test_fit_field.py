"""`fit --from-field` (issue 20) over a real mongod: a projector whose input is the DINOv2 vectors stored in a
field, written by our `compute_embeddings` or by another model (a stand-in FiftyOne zoo model registered in the
isolated zoo). Each fits, then indexes every sample from the field with the files of every sample outside the
training sample moved away, so any attempt to open one would fail and be counted: none is. A new sample without
the field is embedded by the producer first. A field of the wrong width, or of no known producer, is refused in
one line before any work."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fiftyone.zoo", reason="fiftyone is not installed (pip install '.[fiftyone]')")

import fiftyone as fo

REPO = Path(__file__).resolve().parents[2]
SMALL = ("--epochs", "2", "--hidden-dim", "32", "--num-blocks", "1", "--batch-size", "32", "--device", "cpu",
         "--dtype", "fp32", "--quiet", "--val-percent", "30")
N, N_TRAIN, WIDTH = 18, 13, 24  # samples; the first N_TRAIN form the training view; the stand-in's width

STANDIN = '''
import numpy as np
import fiftyone.core.models as fom


class StandIn(fom.Model, fom.EmbeddingsMixin):
    """A fixed random projection of a 4x4 thumbnail: a DINOv2 stand-in writing %d-d vectors."""

    def __init__(self):
        self.w = np.random.default_rng(7).normal(size=(48, %d)).astype(np.float32)

    media_type = "image"
    ragged_batches = True
    transforms = None
    preprocess = False
    has_embeddings = True

    def embed(self, arg):
        img = np.asarray(arg, np.float32)[..., :3]
        h, w = img.shape[:2]
        thumb = img[:h - h %% 4, :w - w %% 4].reshape(4, h // 4, 4, w // 4, 3).mean(axis=(1, 3)) / 255.0
        return thumb.ravel() @ self.w

    def embed_all(self, args):
        return np.stack([self.embed(a) for a in args])

    def predict(self, arg):
        raise NotImplementedError

    def predict_all(self, args):
        raise NotImplementedError


def download_model(model_name, model_path):
    open(model_path, "w").write("{}")


def load_model(model_name, model_path, **kwargs):
    return StandIn()
''' % (WIDTH, WIDTH)


def run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


def fit(*args):
    return run("training.run", "fit", *args, *SMALL)


def one_line_error(res, expect: str, out: Path) -> None:
    """Refused with exit 2 and one error line (the tiny model's demo note aside), before anything is written."""
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert res.returncode == 2 and len(errors) == 1 and expect in errors[0], res.stderr[-2000:]
    assert not out.exists()


@pytest.fixture(scope="module")
def standin(mongod):
    """A FiftyOne zoo model 'standin-embedder', registered as a remote source in the isolated zoo directory."""
    folder = Path(fo.config.model_zoo_dir).expanduser() / "standin-zoo"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text(STANDIN)
    (folder / "standin-embedder-v1.json").write_text("{}")
    (folder / "manifest.json").write_text(json.dumps({"name": "standin-zoo", "url": None, "models": [{
        "base_name": "standin-embedder", "base_filename": "standin-embedder.json", "version": "1",
        "author": "tests", "license": "MIT", "source": "tests", "description": "stand-in", "tags": ["embeddings"],
        "date_added": None, "requirements": {"cpu": {"support": True}, "gpu": {"support": True}}}]}))
    yield "standin-embedder"
    shutil.rmtree(folder)


def make_dataset(root: Path, name: str):
    sys.path.insert(0, str(REPO / "tests"))
    from test_fit import shapes_folder

    shapes_folder(root, N, seed=3)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    ds = fo.Dataset(name)
    ds.add_samples([fo.Sample(filepath=p) for p in paths])
    ds.save_view("train", ds.limit(N_TRAIN))
    return ds, paths


def hide_outside_training(paths: list[str]) -> list[str]:
    """Move away the files of every sample outside the training view: opening one now fails (and is counted
    as unreadable by fit, skipped by index)."""
    for p in paths[N_TRAIN:]:
        os.rename(p, p + ".gone")
    return paths[N_TRAIN:]


def index_and_check(ds, model_dir: Path):
    res = run("fiftyone_dinov2clip", "index", ds.name, "--model", model_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "0 unreadable" in res.stdout and "skipped" not in res.stderr, res.stdout + res.stderr[-2000:]
    ds.reload()
    assert len(ds.exists("dinov2clip")) == len(ds)  # every sample projected, none opened outside training
    return res


@pytest.fixture(scope="module")
def ours(tmp_path_factory, zoo_tiny):
    """A dataset whose field 'dino' our compute_embeddings wrote (the tiny model), one training sample without it."""
    from fiftyone_dinov2clip.brain import compute_embeddings

    ds, paths = make_dataset(tmp_path_factory.mktemp("field-ours"), f"field-ours-{os.getpid()}")
    compute_embeddings(ds, zoo_tiny, embeddings_field=None, dinov2_field="dino", progress=False)
    first = ds.first()
    first["dino"] = None  # a training sample without the field: left out, counted
    first.save()
    yield ds, paths
    ds.delete()


@pytest.fixture(scope="module")
def foreign(tmp_path_factory, standin):
    """A dataset whose field 'emb' the stand-in zoo model wrote, through FiftyOne's own compute_embeddings."""
    import fiftyone.zoo as foz

    ds, paths = make_dataset(tmp_path_factory.mktemp("field-foreign"), f"field-foreign-{os.getpid()}")
    ds.compute_embeddings(foz.load_zoo_model(standin), embeddings_field="emb")
    yield ds, paths
    ds.delete()


def test_field_written_by_compute_embeddings_fits_and_indexes_from_the_field(ours, tiny_dir, tmp_path):
    ds, paths = ours
    out = tmp_path / "model"
    hidden = hide_outside_training(paths)
    res = fit("--dataset", ds.name, "--view", "train", "--from-field", "dino", "--model", tiny_dir, "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 of 13 samples without it and 0 non-finite, left out" in res.stdout
    assert "fit: 12 images" in res.stdout and "0 unreadable" in res.stdout
    config = json.loads((out / "config.json").read_text())
    d = config["dinov2"]
    assert (d["field"], d["pooling"], d["hidden_size"], d["producer"]["kind"]) == ("dino", "cls", 32, "dinov2clip")
    assert d["producer"]["model"] == "dinov2clip-test-tiny"
    assert config["provenance"]["fit"]["counts"]["without_field"] == 1

    import dinov2clip

    fitted = dinov2clip.load(str(out), image=False, device="cpu", dtype="fp32")  # what the App loads
    tiny = dinov2clip.load(str(tiny_dir), image=False, device="cpu", dtype="fp32")
    assert fitted.encoder_fingerprint != tiny.encoder_fingerprint  # never taken for a real DINOv2's input
    assert fitted.encode_text(["a red circle"]).shape == (1, tiny.embed_dim)
    from dinov2clip.errors import UserError as CoreError

    with pytest.raises(CoreError, match="embeds no image itself"):  # no DINOv2 named 'field:dino' is looked up
        dinov2clip.load(str(out), device="cpu", dtype="fp32")

    index_and_check(ds, out)  # the training sample without the field: its image exists, the producer embeds it
    from dinov2clip.errors import UserError
    from fiftyone_dinov2clip.brain import compute_embeddings
    from fiftyone_dinov2clip.cli import ensure_model

    with pytest.raises(UserError, match="embeds no image itself"):  # never loads a DINOv2 named 'field:dino'
        compute_embeddings(ds, ensure_model(str(out)), embeddings_field="other")
    for p in hidden:  # a new sample: embedded by the producer (our tiny model), then projected
        os.rename(p + ".gone", p)
    ds.add_sample(fo.Sample(filepath=str(Path(hidden[0]).with_name("new.png"))))
    shutil.copy(hidden[0], Path(hidden[0]).with_name("new.png"))
    res = index_and_check(ds, out)
    assert "embedded 1 images" in res.stdout and f"{len(ds)} projected" in res.stdout


def test_field_written_by_another_model_fits_with_its_producer(foreign, tiny_dir, standin, tmp_path):
    ds, paths = foreign
    out = tmp_path / "model"
    refused = fit("--dataset", ds.name, "--from-field", "emb", "--model", tiny_dir, "--out", out)
    one_line_error(refused, "does not say which model wrote it", out)

    hidden = hide_outside_training(paths)
    res = fit("--dataset", ds.name, "--view", "train", "--from-field", "emb", "--producer", standin,
              "--model", tiny_dir, "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fit: 13 images" in res.stdout and "0 unreadable" in res.stdout
    d = json.loads((out / "config.json").read_text())["dinov2"]
    assert (d["field"], d["hidden_size"], d["producer"]) == ("emb", WIDTH, {"kind": "fiftyone-zoo",
                                                                           "model": d["producer"]["model"]})
    assert d["producer"]["model"].startswith(standin)

    index_and_check(ds, out)
    for p in hidden:
        os.rename(p + ".gone", p)
    new = Path(hidden[0]).with_name("new.png")
    shutil.copy(hidden[0], new)
    ds.add_sample(fo.Sample(filepath=str(new)))  # no 'emb': the stand-in embeds it through FiftyOne
    res = index_and_check(ds, out)
    assert "embedded 1 images" in res.stdout
    ds.reload()
    assert len(ds.exists("emb")) == len(ds)

    # the field now records its producer (the index filled it): a rerun needs no --producer and encodes nothing
    again = fit("--dataset", ds.name, "--view", "train", "--from-field", "emb", "--model", tiny_dir, "--out", out,
                "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 encoded now" in again.stdout


def test_wrong_width_or_unknown_producer_is_refused_in_one_line(foreign, tiny_dir, tmp_path):
    ds, _ = foreign
    ds.set_values("emb2", ds.values("emb"))  # the same vectors in a field that records no producer
    out = tmp_path / "model"
    for args, expect in [
        (("--producer", "dinov2-vits14-torch"), f"holds {WIDTH}-d vectors; dinov2-vits14-torch writes 384-d"),
        (("--producer", "no-such-model"), "no FiftyOne zoo model of that name"),
        (("--producer", "standin-embedder", "--init", tiny_dir), f"takes 32-d inputs; the field holds {WIDTH}-d"),
    ]:
        res = fit("--dataset", ds.name, "--from-field", "emb2", *args, "--model", tiny_dir, "--out", out)
        one_line_error(res, expect, out)

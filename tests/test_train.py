"""The train stage and the tiny pipeline: end to end offline, resume after SIGKILL, torchrun (gloo)."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2clip.errors import UserError

pytest.importorskip("yaml", reason="the pipeline reads YAML configs (the [train] extra)")
pytest.importorskip("braceexpand", reason="shard lists use brace patterns (the [train] extra)")
from training.pipeline import load_config, run_pipeline  # noqa: E402
from training.train import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "training" / "configs" / "tiny.yaml"
# Bar: 3× chance (issue). Measured: test caption→image R@5 0.157 on the first honest run (10 epochs, width 128),
# 0.187 with tiny.yaml as shipped (300 test images: chance 5/300 = 0.017, so ~11× chance).
R5_FACTOR_OVER_CHANCE = 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    summary = run_pipeline(load_config(TINY, ["train.cpu_threads=1"]), out, progress=False)
    return out, summary


def test_tiny_pipeline_end_to_end(tiny_run):
    out, summary = tiny_run
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is skipped without the [train] extra
        assert (out / "train/metrics.png").stat().st_size > 1000
    for rel in ("data/train/train-00000.tar", "base_model/config.json", "precomputed/val/shards/val-00000/meta.json",
                "train/metrics.json", "train/summary.json", "train/checkpoints/last.pt",
                "train/checkpoints/best.pt", "train/model/config.json", "train/model/projector.safetensors",
                "train/model/dinov2/config.json", "train/model/clip/open_clip_config.json"):
        assert (out / rel).is_file(), rel
    history = json.loads((out / "train/metrics.json").read_text())["epochs"]
    assert len(history) == 30 and history[-1]["train"]["loss"] < 0.95 * history[0]["train"]["loss"]
    test = summary["metrics"]["test"]
    assert test["split"] == "test" and test["epoch"] == summary["selected_epoch"]
    chance = 5 / test["recalls"]["pairs"]
    assert test["recalls"]["image_retrieval_recall@5"] >= R5_FACTOR_OVER_CHANCE * chance, test["recalls"]


def test_model_directory_loads_and_ranks_red_circles(tiny_run):
    import io

    import dinov2clip
    from PIL import Image
    from training.precompute import read_samples

    out, summary = tiny_run
    model = dinov2clip.load(summary["model"], device="cpu", dtype="fp32")
    prov = model.config.provenance
    assert prov["selected_on"] == "val" and prov["selected_epoch"] == summary["selected_epoch"]
    assert prov["seed"] == 0 and len(prov["data_manifest_sha256"]) == 64 and prov["recipe"] == "tiny"
    assert "git_sha" in prov and prov["metrics"]["test"]["ks"] == [1, 5, 10]
    assert model.config.dinov2["pooling"] == "mean"
    samples = list(read_samples(str(out / "data/test/test-00000.tar")))
    captions = [s["txt"].decode() for s in samples]
    emb = model.encode_image([Image.open(io.BytesIO(s["jpg"])) for s in samples])
    top = (emb @ model.encode_text(["a red circle"]).T).squeeze(1).argsort(descending=True)[:5]
    assert all(captions[i].startswith("a red") for i in top), [captions[i] for i in top]


def test_quickstart_examples_rank_their_caption_first(tiny_run):
    """The README's quickstart queries examples/images with this model: "a red circle" must find the red
    circle. Measured: 5–6 of the 6 captions rank their own image first over 5 random draws of such images
    (the random tiny towers carry colour well and shape poorly); the shipped draw gives 6 of 6."""
    import dinov2clip

    _, summary = tiny_run
    model = dinov2clip.load(summary["model"], device="cpu", dtype="fp32")
    paths = sorted((ROOT / "examples" / "images").glob("*.png"))
    captions = ["a " + p.stem.replace("_", " ") for p in paths]
    top = (model.encode_text(captions) @ model.encode_image(paths).T).argmax(1).tolist()
    assert top[captions.index("a red circle")] == captions.index("a red circle")
    assert sum(i == j for i, j in enumerate(top)) >= 5, [captions[j] for j in top]


def test_checkpoint_reads_with_weights_only(tiny_run):
    out, _ = tiny_run
    state = torch.load(out / "train/checkpoints/last.pt", weights_only=True)
    assert state["epoch"] == 29 and torch.is_tensor(state["rng"]["torch"]) and "optimizer" in state
    assert json.loads(state["config"])["contrastive_weight"] == 1.0


def _cfg(tiny_run, out, **kw) -> TrainConfig:
    pre = tiny_run[0] / "precomputed"
    base = dict(train=[str(pre / "train")], val=[str(pre / "val")], out=str(out), pooling="mean", hidden_dim=64,
                num_blocks=1, epochs=3, batch_size=200, lr=3e-3, mse_weight=0.5, contrastive_weight=1.0,
                device="cpu", cpu_threads=1, progress=False, model_source=str(tiny_run[0] / "base_model"))
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def uninterrupted(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train(_cfg(tiny_run, out))
    return out


def write_shapes_karpathy(root: Path, n_val: int = 12, n_test: int = 4) -> Path:
    """A Karpathy-format file over coloured shapes (1–3 captions an image) under root/val2014."""
    from training.synthetic import COLOURS, SHAPES, shape_image

    rng = np.random.default_rng(7)
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n_val + n_test):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
        shape_image(rng, colour, shape, 64).save(root / "val2014" / f"s{i}.jpg", quality=90)
        captions = [f"a {colour} {shape}", f"a photo of a {colour} {shape}", f"{colour} {shape}"][:1 + i % 3]
        items.append({"filepath": "val2014", "filename": f"s{i}.jpg", "split": "val" if i < n_val else "test",
                      "sentences": [{"raw": c} for c in captions]})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": items}))
    return path


def test_karpathy_val_split_selects_the_epoch(tiny_run, tmp_path):
    """Per-epoch recall on a Karpathy val split (many captions an image), pooled as trained ('cls' here, the
    base model pools 'mean'), selects the epoch; it equals the exported model's own recall on those images."""
    import dinov2clip
    from training.datasets import load_karpathy
    from training.metrics import retrieval_recall

    file = write_shapes_karpathy(tmp_path / "coco")
    cfg = _cfg(tiny_run, tmp_path / "run", pooling="cls", epochs=4, val_karpathy=[str(file)],
               val_images=[str(tmp_path / "coco")], eval_cache=str(tmp_path / "cache"))
    summary = train(cfg)
    history = json.loads((tmp_path / "run/metrics.json").read_text())["epochs"]
    scores = [r["val_karpathy"]["coco"]["mean_recall"] for r in history]
    assert all(r["val_karpathy"]["coco"]["images"] == 12 and r["val_karpathy"]["coco"]["captions"] == 24
               for r in history)
    assert summary["selected_on"] == "karpathy-val" and summary["selected_epoch"] == 1 + int(np.argmax(scores))
    picked = summary["metrics"]["val_karpathy"]["recalls"]["coco"]
    model = dinov2clip.load(summary["model"], device="cpu", dtype="fp32")
    assert model.config.dinov2["pooling"] == "cls" and model.config.provenance["selected_on"] == "karpathy-val"
    ds = load_karpathy(file, tmp_path / "coco", split="val")
    direct = retrieval_recall(model.encode_image(ds.images), model.encode_text(ds.captions), ds.text_image_ids)
    for k, v in direct.items():
        assert picked[k] == pytest.approx(v, abs=1e-9), (k, picked[k], v)
    assert any((tmp_path / "cache").glob("dinov2-*.npz"))  # embedded once, through eval's cache
    with pytest.raises(UserError, match="one val_images root per val_karpathy"):
        train(_cfg(tiny_run, tmp_path / "bad", val_karpathy=[str(file)]))


KILL_MID_EPOCH = """
import os, signal
from training import data
calls = [0]
real = data.EmbeddingSet.batch
def batch(self, index):
    calls[0] += 1
    if calls[0] == 18:  # 12 steps an epoch: inside epoch 2
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, index)
data.EmbeddingSet.batch = batch
"""
KILL_IN_CHECKPOINT = """
import os, signal, torch
real = torch.save
saves = [0]
def save(obj, path, *a, **k):
    real(obj, path, *a, **k)
    if "last.pt" in str(path):
        saves[0] += 1
        if saves[0] == 2:  # epoch 2's checkpoint: half written, not yet renamed
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
"""


KILL_BEFORE_BEST = """
import os, signal
import training.train as t
real = t.save_checkpoint
def save(path, state):
    if path.name == "best.pt":  # epoch 1's: last.pt (which names epoch 1 the best) is written, best.pt not
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, state)
t.save_checkpoint = save
"""


@pytest.mark.parametrize("kill", [KILL_MID_EPOCH, KILL_IN_CHECKPOINT, KILL_BEFORE_BEST],
                         ids=["mid-epoch", "in-checkpoint-write", "between-last-and-best"])
def test_sigkill_then_resume_is_bitwise_equal(tiny_run, uninterrupted, tmp_path, kill):
    cfg = _cfg(tiny_run, tmp_path)
    script = kill + f"\nfrom training.train import TrainConfig, train\ntrain(TrainConfig(**{cfg.to_dict()!r}))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (tmp_path / "model").exists()
    with pytest.raises(UserError, match="--resume"):
        train(cfg)
    cfg.resume = True
    train(cfg)
    # Tensors bitwise (the file's bytes are not: safetensors orders its metadata map at random per process).
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "model/projector.safetensors"), load_file(uninterrupted / "model/projector.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    conf = [json.loads((d / "model/config.json").read_text()) for d in (tmp_path, uninterrupted)]
    assert conf[0]["projector"]["tensor_sha256"] == conf[1]["projector"]["tensor_sha256"]
    a = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)
    b = torch.load(uninterrupted / "checkpoints/last.pt", weights_only=True)
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def _max_relative_difference(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in b)


def test_grad_cache_accumulation_equals_one_batch(tiny_run, tmp_path):
    """Contrastive + MSE, 4 micro-batches through GradCache: within 1e-5 relative of no accumulation (the same
    global batch). Without the cache each micro-batch sees its own negatives only, and the model differs."""
    runs = {"one": {}, "cached": {"accum_steps": 4}, "plain": {"accum_steps": 4, "grad_cache": False}}
    models, losses = {}, {}
    for name, kw in runs.items():
        train(_cfg(tiny_run, tmp_path / name, epochs=2, **kw))
        models[name] = torch.load(tmp_path / name / "checkpoints/last.pt", weights_only=True)["model"]
        losses[name] = [r["train"]["loss"] for r in json.loads((tmp_path / name / "metrics.json").read_text())["epochs"]]
    assert _max_relative_difference(models["cached"], models["one"]) <= 1e-5
    np.testing.assert_allclose(losses["cached"], losses["one"], rtol=1e-5)
    assert _max_relative_difference(models["plain"], models["one"]) > 1e-3


def test_torchrun_two_processes_match_one(tiny_run, tmp_path):
    """2 gloo ranks, contrastive + MSE, accumulation 2 (GradCache): within 1e-5 relative of one process with
    the same global batch and no accumulation."""
    cfg = _cfg(tiny_run, tmp_path / "two", accum_steps=2, epochs=2)
    ref = _cfg(tiny_run, tmp_path / "ref", accum_steps=1, epochs=2)
    train(ref)
    args = ["--train", *cfg.train, "--val", *cfg.val, "--out", cfg.out, "--pooling", "mean", "--hidden-dim", "64",
            "--num-blocks", "1", "--epochs", "2", "--batch-size", "200", "--accum-steps", "2", "--lr", "0.003",
            "--mse-weight", "0.5", "--contrastive-weight", "1.0", "--device", "cpu", "--cpu-threads", "1",
            "--no-progress", "--model-source", cfg.model_source]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*torchrun, "-m", "training.run", "train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(f"{cfg.out}/model/projector.safetensors"), load_file(f"{ref.out}/model/projector.safetensors")
    assert a.keys() == b.keys()
    assert _max_relative_difference(a, b) <= 1e-5
    h2 = json.loads(Path(cfg.out, "metrics.json").read_text())["epochs"]
    h1 = json.loads(Path(ref.out, "metrics.json").read_text())["epochs"]
    np.testing.assert_allclose([r["train"]["loss"] for r in h2], [r["train"]["loss"] for r in h1], rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "scenes", "reference"])
def test_shipped_configs_load_by_name_from_anywhere(name, tmp_path, monkeypatch):
    """`--config tiny` is the shipped file wherever you run (an installed wheel has no training/configs
    beside you), even in a folder holding a `tiny` of its own; a path is still read as a path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).mkdir()
    by_path = load_config(ROOT / "training" / "configs" / f"{name}.yaml", ["train.epochs=1"])
    assert load_config(name, ["train.epochs=1"]) == by_path and by_path["name"] == name
    (tmp_path / "mine.yaml").write_text("name: mine\n")
    assert load_config("mine.yaml") == {"name": "mine"}


@pytest.mark.parametrize("argv, message", [
    (["train", "--train", "x"], "--val"),
    (["train", "--config", str(TINY), "--set", "train.nope=1", "--train", "x", "--val", "y"], "unknown train option"),
    (["train", "--config", str(TINY), "--set", "oops", "--train", "x", "--val", "y"], "KEY=VALUE"),
    (["pipeline", "--config", "missing.yaml"], "config not found"),
    (["pipeline", "--config", "./training"], "cannot read config training: Is a directory"),  # a folder here
    (["pipeline", "--config", "nope"], "unknown config 'nope': shipped configs are reference, scenes, tiny;"),
    (["train", "--train", "x", "--val", "y", "--batch-size", "10", "--accum-steps", "3"], "not divisible"),
])
def test_cli_user_errors(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training.run", *argv, "--out" if argv[0] == "train" else "--output",
                           str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_heatmaps_of_the_scenes_model_point_at_the_queried_shape(tmp_path):
    """Issue 22's pointing game at CI's size: 100 scenes (two or three shapes of different colours on varied
    backgrounds, seed 0) with the model `--config scenes` trains; the default heatmap's peak must fall inside
    the queried shape's box in most of them. The bar is the issue's goal; chance is about 10 %, and `tiny`, whose
    shapes are all on dark backgrounds, reaches about half (docs/heatmaps.md has every method's figures)."""
    import dinov2clip
    from training.synthetic import scene

    summary = run_pipeline(load_config("scenes", ["train.cpu_threads=1"]), tmp_path, progress=False)
    model = dinov2clip.load(summary["model"], device="cpu", dtype="fp32")
    rng = np.random.default_rng(0)
    hits = 0
    for img, caption, box, _ in (scene(rng) for _ in range(100)):
        heat = model.heatmap([img], caption)[0]
        row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
        hits += box[0] <= col + 0.5 <= box[2] and box[1] <= row + 0.5 <= box[3]
    assert hits >= 80, f"the heatmap's peak fell inside the queried shape in {hits} of 100 scenes"


@pytest.mark.parametrize("bad, message", [("data.shapes.backgrounds=[dark,plaid]", "choose from dark, light"),
                                          ("data.shapes.scale=[0.2,0.7]", "0 < low <= high <= 0.5")])
def test_bad_shapes_options_are_one_line_errors_before_any_work(tmp_path, bad, message):
    out = subprocess.run([sys.executable, "-m", "training.run", "--config", str(TINY), "--output", str(tmp_path / "o"),
                          "--set", bad], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not list((tmp_path / "o").glob("data/train/*.tar"))

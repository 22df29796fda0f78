"""Planted-alignment check: does the trainer recover a known map? Prints the figures.

    python benchmarks/planted.py --out runs/planted                                  # full size
    python benchmarks/planted.py --out runs/planted-small --n-train 60000 --in-dim 8 --out-dim 32 \\
        --hidden 32 --n-eval 1000 --epochs 30 --lr 0.005 --batch-size 256 --proj-hidden 128   # the size CI runs

Data (`planted_alignment`, seeded): inputs [N, in_dim]; unit-norm targets from a random
3-layer Linear+LayerNorm+GELU MLP plus noise calibrated so the true map's own held-out recall@1 is ~0.6
among `n_eval` candidates; captions = targets + independent noise calibrated so the true map's recall@1 on
them is ~0.3; written in the precompute format and trained through the real data path. `--losses`: `mse`
(to the targets), `contrastive` (InfoNCE to the captions, text→image half: the direction scored here and
the direction of text search) and `contrastive-both` (CLIP's symmetric InfoNCE, whose image→text half has
another optimum: training/losses.py). Every figure is scored the same way — the test targets retrieving
the predictions from the test inputs (text→image): the true map's, closed-form ridge regression's (λ
chosen on validation) and the trainer's selected epoch (selected on validation). Caption retrieval is
reported beside it (`*_text`).

`linear_ceiling_pct` asks whether the bar is reachable at all with this many pairs: a *linear* true map
with the same noise calibration, fitted by its exact estimator (least squares), reaches this share of its
own true map. A richer map has more to estimate from the same pairs, so a trainer is not expected to beat
it (a guide, not a theorem): at the full size (768-d, 200k pairs) it is well under the bar, and it is
necessary, not sufficient (figures and commands: docs/planted.md).
Goal (issue): trainer ≥ 90% of the true map and ≥ 10 points above ridge.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.data import EmbeddingSet
from training.rerun import record_or_check

# loss name → (mse_weight, contrastive_weight, contrastive_directions)
LOSSES = {"mse": (1.0, 0.0, "both"), "contrastive": (0.0, 1.0, "text_to_image"),
          "contrastive-both": (0.0, 1.0, "both")}


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    """Inputs with a constant column appended, in float64: the design matrix of a linear map with bias."""
    return torch.cat([x, torch.ones(len(x), 1)], 1).double()


def ridge_recall(train: EmbeddingSet, val: EmbeddingSet, test: EmbeddingSet, lams=(1e-2, 1, 1e2, 1e4)) -> float:
    """Closed-form ridge (with bias) from inputs to targets; λ picked on validation, recall@1 on test."""
    x, y, _ = train.all()
    xa = _with_bias(x)
    gram, rhs = xa.T @ xa, xa.T @ y.double()

    def predict(w, data):
        xv, _, _ = data.all()
        return F.normalize((_with_bias(xv) @ w).float(), dim=-1)

    def solve(lam):
        return torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), rhs)

    best = max(lams, key=lambda lam: recall_at_1(predict(solve(lam), val), val.all()[1]))
    return recall_at_1(predict(solve(best), test), test.all()[1])


def linear_ceiling(n_train: int, n_eval: int, in_dim: int, out_dim: int, target_r1: float = 0.6,
                   seed: int = 0, chunk: int = 50_000) -> float:
    """Share of a linear true map's own recall@1 that least squares reaches from `n_train` noisy pairs,
    the noise calibrated as `planted_alignment` calibrates it (the estimator's error alone sets the gap)."""
    gen = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(in_dim, out_dim, generator=gen) / in_dim ** 0.5
    bias = 0.5 * torch.randn(out_dim, generator=gen)

    def draw(n, sigma=0.0):
        x = torch.randn(n, in_dim, generator=gen)
        clean = F.normalize(x @ weight + bias, dim=-1)
        return x, clean, add_noise(clean, sigma, gen)

    _, cal, _ = draw(n_eval)
    noise = torch.randn(cal.shape, generator=gen) / out_dim ** 0.5
    sigma = calibrate_noise(lambda s: recall_at_1(cal, F.normalize(cal + s * noise, dim=-1)), target_r1)
    gram = torch.zeros(in_dim + 1, in_dim + 1, dtype=torch.float64)
    rhs = torch.zeros(in_dim + 1, out_dim, dtype=torch.float64)
    for start in range(0, n_train, chunk):
        x, _, y = draw(min(chunk, n_train - start), sigma)
        xa = _with_bias(x)
        gram += xa.T @ xa
        rhs += xa.T @ y.double()
    fitted = torch.linalg.solve(gram, rhs)
    x, clean, y = draw(n_eval, sigma)
    pred = F.normalize((_with_bias(x) @ fitted).float(), dim=-1)
    return 100 * recall_at_1(pred, y) / recall_at_1(clean, y)


def trained_recall(run_dir: Path, test: EmbeddingSet, hidden: int, num_blocks: int) -> dict:
    """The selected epoch's projector on test, retrieving the targets (as the true map and ridge are
    scored) and the captions (what the trainer's own metrics report)."""
    from dinov2clip.projector import ProjectorWithResiduals

    x, target, text = test.all()
    projector = ProjectorWithResiduals(x.shape[1], target.shape[1], hidden, num_blocks)
    state = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    projector.load_state_dict(state["projector"])
    with torch.no_grad():
        pred = F.normalize(projector.eval()(x).float(), dim=-1)
    return {"target": recall_at_1(pred, target), "text": recall_at_1(pred, text), "epoch": int(state["epoch"])}


def run_planted(out, n_train: int = 200_000, n_eval: int = 5_000, in_dim: int = 768, out_dim: int = 512,
                hidden: int = 512, epochs: int = 16, batch_size: int = 1024, lr: float = 2e-3, proj_hidden: int = 1024,
                num_blocks: int = 2, seed: int = 0, progress: bool = False, cpu_threads: int = 0,
                losses=("mse", "contrastive"), **train_options) -> dict:
    """Generate (once) and train; `train_options` go to `TrainConfig` (e.g. weight_decay=0.0)."""
    from training.config import TrainConfig
    from training.train import train

    out = Path(out)
    data_config = {"n_train": n_train, "n_eval": n_eval, "in_dim": in_dim, "out_dim": out_dim, "hidden": hidden,
                   "seed": seed}
    record_or_check(out / "planted-config.json", data_config, f"the planted data in {out}",
                    "use a new --out", made=(out / "data").exists())
    if not (out / "data" / "planted.json").is_file():
        planted_alignment(out / "data", n_train=n_train, n_val=n_eval, n_test=n_eval, in_dim=in_dim,
                          out_dim=out_dim, hidden=hidden, per_shard=max(n_eval, 50_000), seed=seed)
    figures = json.loads((out / "data" / "planted.json").read_text())
    sets = {s: EmbeddingSet([out / "data" / s], "cls") for s in ("train", "val", "test")}
    # every recall here is scored the same way: test inputs → predictions retrieving the test *targets*
    # (the true map's own recall is calibrated on that task); caption retrieval is reported beside it
    result = {"true_map_r1": figures["true_map_test_r1"], "true_map_r1_text": figures.get("true_map_test_r1_text"),
              "ridge_r1": ridge_recall(sets["train"], sets["val"], sets["test"]),
              "linear_ceiling_pct": linear_ceiling(figures["n_train"], figures["n_test"], figures["in_dim"],
                                                   figures["out_dim"], seed=figures["seed"])}
    for loss in losses:
        if loss == "fit":  # fit's own data path: image-only shards, its train stage and epoch selection
            run_dir = fit_path(out, sets, proj_hidden, num_blocks, epochs, batch_size, lr, seed, progress, cpu_threads)
        else:
            run_dir = out / loss
            train(TrainConfig(train=[str(out / "data" / "train")], val=[str(out / "data" / "val")],
                              test=[str(out / "data" / "test")], out=str(run_dir), pooling="cls",
                              hidden_dim=proj_hidden, num_blocks=num_blocks, epochs=epochs, batch_size=batch_size,
                              lr=lr, mse_weight=LOSSES[loss][0], contrastive_weight=LOSSES[loss][1],
                              contrastive_directions=LOSSES[loss][2], ks=[1],
                              select_metric="image_retrieval_recall@1", seed=seed, progress=progress, resume=True,
                              cpu_threads=cpu_threads, **train_options))
        scored = trained_recall(run_dir, sets["test"], proj_hidden, num_blocks)
        r1 = result[f"{loss}_r1"] = scored["target"]
        result[f"{loss}_r1_text"], result[f"{loss}_epoch"] = scored["text"], scored["epoch"]
        result[f"{loss}_pct_of_true"] = 100 * r1 / result["true_map_r1"]
        result[f"{loss}_points_over_ridge"] = 100 * (r1 - result["ridge_r1"])
        result[f"{loss}_pass"] = r1 >= 0.9 * result["true_map_r1"] and r1 >= result["ridge_r1"] + 0.10
    (out / "figures.json").write_text(json.dumps(result, indent=2))
    return result


def fit_path(out: Path, sets: dict, hidden: int, num_blocks: int, epochs: int, batch_size: int, lr: float, seed: int,
             progress: bool, cpu_threads: int) -> Path:
    """The planted train and val pairs as `fit` stores images (no captions), trained by `fit`'s train stage
    (MSE, the epoch selected on image↔teacher recall); returns its training run directory."""
    from training.fit import train_stage
    from training.shards import write_shard

    features = out / "fit" / "features" / "planted"
    names = {}
    for split in ("train", "val"):
        data = sets[split]
        names[split] = []
        for i, shard in enumerate(data.shards):
            name = f"{split}-{i:05d}"
            if not (features / "shards" / name / "meta.json").is_file():
                arrays = {k: np.asarray(shard[k]) for k in ("dinov2_cls", "dinov2_patch_mean", "clip_image")}
                arrays["clip_text"] = np.zeros_like(arrays["clip_image"])
                count = shard["meta"]["count"]
                write_shard(features, name, arrays, [str(j) for j in range(count)], [""] * count,
                            {"num_patches": shard["meta"]["num_patches"], "captioned": False,
                             "encoders": shard["meta"].get("encoders")})
            names[split].append(name)
    recipe = {"version": "planted", "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "hidden_dim": hidden, "num_blocks": num_blocks, "pooling": "cls"}
    threads = torch.get_num_threads()
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    try:
        return train_stage(features, names["train"], names["val"], recipe, None, "", "cpu", progress).run / "train"
    finally:
        torch.set_num_threads(threads)


# -- planted alignment ----------------------------------------------------------------------------

class PlantedMap(nn.Module):
    """The true map: 3 × (Linear → LayerNorm → GELU) then Linear, output L2-normalised."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        super().__init__()
        layers, d = [], in_dim
        for _ in range(3):
            layers += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.GELU()]
            d = hidden
        self.net = nn.Sequential(*layers, nn.Linear(d, out_dim))

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)


def add_noise(clean: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Unit-norm `clean` + isotropic Gaussian noise of norm ~`sigma`, renormalised."""
    noise = torch.randn(clean.shape, generator=gen) / math.sqrt(clean.shape[1])
    return F.normalize(clean + sigma * noise, dim=-1)


def recall_at_1(pred: torch.Tensor, target: torch.Tensor) -> float:
    """target → pred R@1 among all rows (the trainer's `image_retrieval_recall@1`)."""
    from training.metrics import retrieval_recall

    return retrieval_recall(pred, target, list(range(len(pred))), ks=(1,))["image_retrieval_recall@1"]


def calibrate_noise(recall_of, goal: float, hi: float = 16.0) -> float:
    """The noise level at which `recall_of(level)` (falling as the level rises) is ~`goal`: bisection."""
    lo = 0.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if recall_of(mid) > goal else (lo, mid)
    return (lo + hi) / 2


def planted_alignment(out_dir, n_train: int = 200_000, n_val: int = 5_000, n_test: int = 5_000,
                      in_dim: int = 768, out_dim: int = 512, hidden: int = 512, target_r1: float = 0.6,
                      text_r1: float = 0.3, text_sigma: float | None = None, per_shard: int = 50_000,
                      seed: int = 0) -> dict:
    """Write train/val/test in the precompute format (inputs as `cls`, so train with pooling 'cls').

    Noise levels are set by bisection on a calibration draw of `n_val` pairs: targets = true map + noise
    such that the true map's own recall@1 retrieving the targets is ~`target_r1`; text targets = targets +
    independent noise such that the true map's recall@1 retrieving the *texts* is ~`text_r1` (like a
    caption, noisier than the image embedding but still informative) unless `text_sigma` is given. (At the
    full size, text noise as large as the targets' own leaves the true map at recall 0.004 on texts: a
    contrastive loss would then learn from almost nothing.) Returns the levels and the true map's recalls."""
    from training.shards import write_shard

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    true_map = PlantedMap(in_dim, out_dim, hidden).eval()
    # inputs are scaled like LayerNormed DINOv2 features (unit variance per dimension)

    def draw(n):
        x = torch.randn(n, in_dim, generator=gen)
        with torch.no_grad():
            return x, true_map(x)

    _, cc = draw(n_val)
    noise1 = torch.randn(cc.shape, generator=gen) / math.sqrt(out_dim)
    noise2 = torch.randn(cc.shape, generator=gen) / math.sqrt(out_dim)
    sigma = calibrate_noise(lambda s: recall_at_1(cc, F.normalize(cc + s * noise1, dim=-1)), target_r1)
    cal_target = F.normalize(cc + sigma * noise1, dim=-1)
    if text_sigma is None:
        text_sigma = calibrate_noise(lambda s: recall_at_1(cc, F.normalize(cal_target + s * noise2, dim=-1)), text_r1)
    out = Path(out_dir)
    figures = {"sigma": sigma, "text_sigma": text_sigma}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for s, start in enumerate(range(0, n, per_shard)):
            m = min(per_shard, n - start)
            x, clean = draw(m)
            target = add_noise(clean, sigma, gen)
            text = add_noise(target, text_sigma, gen)
            keys = [f"{split}{start + i:08d}" for i in range(m)]
            write_shard(out / split, f"{split}-{s:05d}",
                        {"dinov2_cls": x.numpy(), "dinov2_patch_mean": x.numpy(), "clip_image": target.numpy(),
                         "clip_text": text.numpy()},
                        keys, [""] * m, {"num_patches": 0, "source": "planted", "skipped": 0, "skipped_keys": {}})
            if split == "test" and s == 0:  # the ceilings: the true map retrieving targets, and captions
                figures["true_map_test_r1"] = recall_at_1(clean, target)
                figures["true_map_test_r1_text"] = recall_at_1(clean, text)
    (out / "planted.json").write_text(json.dumps({**figures, "seed": seed, "in_dim": in_dim, "out_dim": out_dim,
                                                  "n_train": n_train, "n_val": n_val, "n_test": n_test}, indent=2))
    return figures

"""After the loop: per-epoch metrics (JSON + plot), the selected epoch evaluated once on test, and the
model directory it is exported as (encoders of the training data + this projector, with provenance)."""
from __future__ import annotations

from pathlib import Path

import torch

from dinov2clip.atomic import atomic_path, write_json_atomic
from dinov2clip.errors import UserError
from dinov2clip.projector import ProjectorWithResiduals

from .config import TrainConfig
from .data import EmbeddingSet
from .validation import evaluate_split, judged_on_karpathy, load_split, teacher_recall


def write_metrics(out: Path, history: list, cfg: TrainConfig) -> None:
    write_json_atomic(out / "metrics.json", {"split": "val", "ks": list(cfg.ks), "select_metric": cfg.select_metric,
                                             "epochs": history})
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [r["train"]["loss"] for r in history], "o-", label="train loss")
    a.plot(epochs, [r["val"]["mse"] for r in history], "s--", label="val unit-norm MSE")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    for k in cfg.ks:
        b.plot(epochs, [r["val"][f"image_retrieval_recall@{k}"] for r in history], "o-", label=f"text→image R@{k}")
    b.set_xlabel("epoch"), b.set_ylabel("validation recall"), b.set_ylim(0, 1), b.legend()
    fig.tight_layout()
    with atomic_path(out / "metrics.png") as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def finish(cfg: TrainConfig, projector, train_data, val_data, history, best, out: Path, device) -> dict:
    """Load the selected epoch, evaluate test once, write the model directory with provenance."""
    state = torch.load(out / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    if state["epoch"] != best["epoch"]:  # never export another epoch than the one selected
        raise UserError(f"{out / 'checkpoints'}: best.pt holds epoch {state['epoch']}, last.pt selected epoch "
                        f"{best['epoch']}: the checkpoints disagree; train again into a new --out")
    final = ProjectorWithResiduals(**projector.config.to_dict())
    final.load_state_dict(state["projector"])
    final.to(device).eval()
    selected = history[best["epoch"] - 1]
    metrics = {"val": {"split": "val", "ks": list(cfg.ks), "epoch": best["epoch"], "recalls": selected["val"]}}
    if "val_karpathy" in selected:
        metrics["val_karpathy"] = {"split": cfg.val_split, "ks": list(cfg.ks), "epoch": best["epoch"],
                                   "recalls": selected["val_karpathy"]}
    selected_on = f"karpathy-{cfg.val_split}" if judged_on_karpathy(selected, cfg) else "val"
    if cfg.test:
        test_data = load_split(cfg.test, cfg, device)
        metrics["test"] = {"split": "test", "ks": list(cfg.ks), "epoch": best["epoch"],
                           "recalls": evaluate_split(final, test_data, cfg.ks),
                           "teacher_recalls": teacher_recall(test_data, cfg.ks)}
    model_dir = export_model(cfg, final.cpu(), train_data, metrics, best, out / "model", selected_on)
    summary = {"model": str(model_dir) if model_dir else None, "selected_epoch": best["epoch"],
               "selected_on": selected_on, "metrics": metrics, "history": history}
    write_json_atomic(out / "summary.json", summary)
    return summary


def git_sha() -> str | None:
    from .evaluate import code_version

    return code_version().get("git")


def export_model(cfg: TrainConfig, projector, train_data: EmbeddingSet, metrics: dict, best: dict, out_dir: Path,
                 selected_on: str = "val"):
    """A dinov2clip model directory: the precompute's DINOv2 + CLIP (bundled copies kept), this projector."""
    from dinov2clip.config import ModelConfig
    from dinov2clip.factory import resolve_source
    from dinov2clip.modeldir import save_model_dir

    enc = train_data.encoders
    source = cfg.model_source or (enc or {}).get("source")
    # the factory's reading of the source: a preset is never taken for a folder of the same name
    base, root = resolve_source(source) if source else (None, None)
    if root is None and enc and enc.get("config"):  # a preset: its encoders as precompute recorded them
        base = ModelConfig.from_dict(enc["config"])
    if base is None:  # synthetic embeddings (planted alignment): nothing to build a model directory from
        print("no model source recorded or given (--model-source): checkpoints only, no model directory")
        return None
    base.dinov2 = {**base.dinov2, "pooling": cfg.pooling}
    base.projector = {}
    base.weights_sha256 = {}
    base.provenance = {
        "recipe": cfg.recipe or "training.run train", "train_config": cfg.to_dict(),
        "data_manifest_sha256": train_data.data_sha256, "seed": cfg.seed, "git_sha": git_sha(),
        "selected_epoch": best["epoch"], "selected_on": selected_on, "selection_metric": cfg.select_metric,
        "metrics": metrics, "base_model": str(source),
        **({"demo": base.provenance["demo"]} if base.provenance.get("demo") else {}),  # random towers stay a demo
    }
    return save_model_dir(base, projector, out_dir, overwrite=True, parts=root)

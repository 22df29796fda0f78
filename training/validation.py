"""Validation during training: recall@K on held-out pairs and on Karpathy val splits, and the score that
selects the epoch. Evaluated with the projector being trained on precomputed features."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dinov2clip.errors import UserError

from .config import TrainConfig
from .data import EmbeddingSet
from .metrics import retrieval_recall


def load_split(dirs, cfg: TrainConfig, device) -> EmbeddingSet:
    """A precomputed split, resident on the training device when it fits (`cfg.resident`)."""
    data = EmbeddingSet(dirs, cfg.pooling)
    nbytes = sum(s[k].nbytes for s in data.shards for k in ("dinov2_cls", "dinov2_patch_mean", "clip_image",
                                                              "clip_text")) * 2  # float32 on device
    resident = {"yes": True, "no": False}.get(cfg.resident, nbytes <= cfg.resident_max_gb * 2 ** 30)
    if resident:
        data = EmbeddingSet(dirs, cfg.pooling, resident=True, device=device)
    else:
        data.device = device
    return data




@torch.no_grad()
def evaluate_split(projector, data: EmbeddingSet, ks, batch: int = 8192) -> dict:
    """Recall@K of caption → image and image → caption over all pairs of `data`, plus the MSE."""
    from .losses import unit_mse

    was = projector.training
    projector.eval()
    preds, texts, mse, n = [], [], 0.0, len(data)
    for i in range(0, n, batch):
        x, img, txt = data.batch(np.arange(i, min(i + batch, n)))
        p = projector(x).float()
        mse += unit_mse(p, img).item() * len(x)
        preds.append(torch.nn.functional.normalize(p, dim=-1).cpu())
        texts.append(txt.cpu())
    projector.train(was)
    return {**recalls_with_mean(torch.cat(preds), torch.cat(texts), list(range(n)), ks), "mse": mse / n, "pairs": n}


def recalls_with_mean(pred, text, text_image_ids, ks) -> dict:
    """Recall@K both ways and their mean (the default selection metric)."""
    recalls = retrieval_recall(pred, text, text_image_ids, ks=ks)
    return {**recalls, "mean_recall": float(np.mean(list(recalls.values())))}


@torch.no_grad()
def evaluate_features(projector, val: dict, ks, batch: int = 8192) -> dict:
    """Recall@K of a Karpathy set from its pooled DINOv2 features and caption embeddings (many captions per image)."""
    was = projector.training
    projector.eval()
    device = next(projector.parameters()).device
    preds = [torch.nn.functional.normalize(projector(val["x"][i:i + batch].to(device)).float(), dim=-1).cpu()
             for i in range(0, len(val["x"]), batch)]
    projector.train(was)
    return {**recalls_with_mean(torch.cat(preds), val["text"], val["text_image_ids"], ks), "images": len(val["x"]),
            "captions": len(val["text"])}


def load_karpathy_val(cfg: TrainConfig, train_data: EmbeddingSet, device) -> list[dict]:
    """Each Karpathy val split embedded once — DINOv2 pooled as trained, captions by the CLIP text tower —
    with the models the training embeddings came from (read from the eval cache when seen before)."""
    from dinov2clip import load_encoders

    from .datasets import load_karpathy, name_uniquely
    from .encode import EmbeddingCache, embed_set
    from .evaluate import default_cache_dir

    enc = train_data.encoders or {}
    source = cfg.model_source or enc.get("source")
    if not source:
        raise UserError("val_karpathy needs the model the training embeddings came from: pass --model-source")
    sets = name_uniquely([load_karpathy(f, root, split=cfg.val_split)
                          for f, root in zip(cfg.val_karpathy, cfg.val_images)])
    # encoders only: no projector exists yet (the one being trained is applied to these features)
    encoders = load_encoders(source, device=str(device), dtype=enc.get("dtype", "auto"), teacher=True)
    cache = EmbeddingCache(Path(cfg.eval_cache) if cfg.eval_cache else default_cache_dir())
    out = []
    for ds in sets:
        # pooled as the projector is trained, whatever the source's pooling
        emb = embed_set(encoders, ds, cache, skip_unreadable=True, progress=cfg.progress, pooling=cfg.pooling)
        out.append({"name": ds.name, "x": torch.from_numpy(emb.dinov2), "text": torch.from_numpy(emb.text),
                    "text_image_ids": list(emb.dataset.text_image_ids), "summary": emb.dataset.summary()})
    return out


def teacher_recall(data: EmbeddingSet, ks) -> dict:
    _, img, text = data.all()
    return retrieval_recall(img.cpu(), text.cpu(), list(range(len(data))), ks=ks)


def judged_on_karpathy(row: dict, cfg: TrainConfig) -> bool:
    """Whether this epoch's row is judged on the Karpathy sets (only rank 0 evaluates those)."""
    return cfg.selects_on_karpathy and "val_karpathy" in row


def selection_score(row: dict, cfg: TrainConfig) -> float:
    """The validation figure that picks the epoch: on the held-out pairs, or the mean over the Karpathy sets
    (other ranks never export, so their choice is not used)."""
    if judged_on_karpathy(row, cfg):
        return float(np.mean([v[cfg.select_metric] for v in row["val_karpathy"].values()]))
    return row["val"][cfg.select_metric]

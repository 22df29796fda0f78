"""The eval stage: embed each set once with the model and its CLIP teacher, score every row, write
results.json, results.md and recalls.png (DESIGN §6).

    python -m training.run eval --model MODEL_DIR --karpathy dataset_coco.json --images COCO_ROOT \\
        --split test --out eval/coco

Rows: the model, its teacher ("CLIP"), then any checkpoints, weight averages and ensembles, all
scored by the same metric on the same embedded data.
"""
from __future__ import annotations

import datetime
import importlib.util
import subprocess
import warnings
from pathlib import Path
from typing import Sequence

import torch

from dinov2clip.errors import UserError

from .datasets import RetrievalSet
from .encode import PIPELINE_VERSION, EmbeddingCache, clip_identity, dinov2_identity, embed_set, load_models
from .metrics import DEFAULT_KS, check_ks, recall_from_ranks, retrieval_ranks
from .report import FILES, check_teacher, report_files, teacher_warning, write_report
from .variants import load_variants

EVAL_FORMAT = "dinov2clip-eval/1"
MODEL_ROW, TEACHER_ROW = "dinov2clip", "CLIP"


class TeacherCheckWarning(UserWarning):
    """The teacher's own recall is off CLIP_benchmark's published figure for it."""


def default_cache_dir() -> Path:
    from dinov2clip.sources import cache_dir

    return cache_dir() / "eval"


def evaluate(model: str, datasets: Sequence[RetrievalSet], out_dir, *, ks: Sequence[int] = DEFAULT_KS,
             device: str | None = None, dtype="auto", batch_size: int = 32,
             checkpoints: Sequence[str] = (), weight_averages: Sequence[Sequence[str]] = (),
             ensembles: Sequence[Sequence[str]] = (), cache_dir: Path | None | bool = None,
             skip_missing: bool = False, workers: int | None = None, progress: bool = True) -> dict:
    """Evaluate and write the report into `out_dir`; returns the report (the JSON's content).

    `cache_dir`: None = the default cache (`$DINOV2CLIP_CACHE/eval`), False = no cache."""
    try:
        ks = check_ks(ks)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not datasets:
        raise UserError("no dataset to evaluate: give --karpathy FILE --images ROOT or --folder DIR --captions FILE")
    names = [ds.name for ds in datasets]
    if len(set(names)) != len(names):
        raise UserError(f"two datasets are named alike ({', '.join(names)}): give each RetrievalSet its own name")
    if importlib.util.find_spec("matplotlib") is None:  # before the work, not after it
        raise UserError("the eval plot needs matplotlib: pip install 'dinov2clip[train]'")
    report_files(out_dir, FILES, EVAL_FORMAT)  # a file, or another program's results there: refused now

    models = load_models(model, device=device, dtype=dtype, batch_size=batch_size)
    variants = load_variants(models, checkpoints, weight_averages, ensembles)  # fail before any embedding
    cache = EmbeddingCache(None if cache_dir is False else (cache_dir or default_cache_dir()))
    rows = [{"name": MODEL_ROW, "kind": "model", "sources": [str(model)], "epoch": None},
            {"name": TEACHER_ROW, "kind": "teacher", "sources": [clip_identity(models)["origin"]], "epoch": None}]
    rows += [{"name": v.name, "kind": v.kind, "sources": v.sources, "epoch": v.epoch} for v in variants]
    for row in rows:
        row["recalls"] = {}
    summaries, checks = [], []
    for ds in datasets:
        emb = embed_set(models, ds, cache, skip_unreadable=skip_missing, workers=workers, progress=progress)
        checks += _score_set(models, variants, emb, rows, ks)
        summaries.append({**emb.dataset.summary(), "cache": emb.cache})

    _add_ratios(rows)
    split = _common_split(datasets)
    report_warnings = [teacher_warning(c) for c in checks if not c["ok"]]
    for w in report_warnings:
        warnings.warn(w, TeacherCheckWarning, stacklevel=2)
    report = {
        "format": EVAL_FORMAT,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "code_version": code_version(),
        "model": _model_info(model, models),
        "teacher": {**clip_identity(models), "preprocess": models.teacher_preprocess},
        "settings": {"ks": list(ks), "split": split, "dtype": str(models.dtype).removeprefix("torch."),
                     "device": str(models.device), "batch_size": batch_size, "skip_missing": skip_missing,
                     "tie_policy": "pessimistic: a positive ranks behind every negative scoring at least as high",
                     "metric": "CLIP_benchmark zeroshot_retrieval recall@K (fractions)",
                     "cache_dir": None if cache.root is None else str(cache.root)},
        "datasets": summaries,
        "rows": rows,
        "selection": _selection(rows, split),
        "teacher_check": checks,
        "warnings": report_warnings,
    }
    report["files"] = write_report(report, out_dir)
    return report


def _score_set(models, variants, emb, rows: list[dict], ks) -> list[dict]:
    """Every row's recalls on one embedded set, in place; returns the teacher's published-figure checks."""
    ds = emb.dataset
    text = torch.from_numpy(emb.text)
    image_sets = [models.project(emb.dinov2).cpu(), torch.from_numpy(emb.teacher)]
    image_sets += [v.embed(emb.dinov2, emb.teacher) for v in variants]
    checks = []
    for row, images in zip(rows, image_sets):
        text_rank, image_rank = retrieval_ranks(images, text, ds.text_image_ids)
        row["recalls"][ds.name] = recall_from_ranks(text_rank, image_rank, ks)
        if row["kind"] == "teacher":
            r5 = recall_from_ranks(text_rank, image_rank, (5,))  # whatever K the user asked for
            checks = [dict(c, skipped=len(ds.skipped)) for c in check_teacher(models.config.clip, ds, r5)]
    return checks


def _common_split(datasets) -> str | None:
    splits = {ds.split for ds in datasets}
    return splits.pop() if len(splits) == 1 else "+".join(sorted(str(s) for s in splits))


def _add_ratios(rows: list[dict]) -> None:
    teacher = next(r for r in rows if r["kind"] == "teacher")
    for row in rows:
        row["percent_of_clip"], row["mean_percent_of_clip"], row["mean_recall"] = {}, {}, {}
        for name, recalls in row["recalls"].items():
            pct = {k: (100 * v / teacher["recalls"][name][k] if teacher["recalls"][name][k] > 0 else None)
                   for k, v in recalls.items()}
            defined = [p for p in pct.values() if p is not None]
            row["percent_of_clip"][name] = pct
            row["mean_percent_of_clip"][name] = sum(defined) / len(defined) if defined else None
            row["mean_recall"][name] = sum(recalls.values()) / len(recalls)


def _selection(rows: list[dict], split: str | None) -> dict | None:
    candidates = [r for r in rows if r["kind"] == "checkpoint"]
    if len(candidates) < 2:
        return None
    score = {r["name"]: sum(r["mean_recall"].values()) / len(r["mean_recall"]) for r in candidates}
    return {"split": split, "criterion": "mean recall over datasets, both directions and every K",
            "scores": score, "best": max(score, key=score.get)}


def _model_info(source: str, models) -> dict:
    config = models.config
    local = Path(source)
    return {"source": str(local.resolve()) if local.is_dir() else source, "fingerprint": models.fingerprint,
            "projector_sha256": models.projector.sha256, "weights_sha256": config.weights_sha256,
            "dinov2": dinov2_identity(models), "clip": clip_identity(models), "preprocess": config.preprocess}


def code_version() -> dict:
    import open_clip
    import transformers

    import dinov2clip

    out = {"dinov2clip": dinov2clip.__version__, "eval_format": EVAL_FORMAT, "pipeline": PIPELINE_VERSION,
           "torch": torch.__version__, "open_clip": open_clip.__version__, "transformers": transformers.__version__,
           "git": None}
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if sha.returncode == 0:
            out["git"] = sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out

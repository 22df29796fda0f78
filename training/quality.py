"""Text search quality on your own images (DESIGN §8): the model against its CLIP teacher, same images, same
queries, no captions needed.

    python -m training.run quality IMAGES... --model MODEL --out DIR [--queries FILE] [--labels folder]

- teacher agreement@k: per query, the share of the teacher's top-k images that the model's top-k also holds,
  averaged over queries — "% of CLIP on your data" (k is cut to the number of images; the report says so);
- rank correlation: Spearman's rho between the model's and the teacher's scores of all images, per query,
  averaged;
- with labels (a class per image): zero-shot accuracy (each image → its best class prompt) and precision@k of
  each class prompt, for the model and the teacher side by side, and their ratio.
The teacher against itself scores exactly 1 everywhere. Queries: one per line of a file, the label classes
through a template ("a photo of a {}"), or the built-in general vocabulary below.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dinov2clip.atomic import atomic_path
from dinov2clip.errors import UserError

KS = (10, 50)
TEMPLATE = "a photo of a {}"
# A general vocabulary for photos when no queries or labels are given: the 80 COCO object categories.
VOCABULARY = [w.replace("-", " ") for w in (
    "person bicycle car motorcycle airplane bus train truck boat traffic-light fire-hydrant stop-sign "
    "parking-meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie "
    "suitcase frisbee skis snowboard sports-ball kite baseball-bat baseball-glove skateboard surfboard "
    "tennis-racket bottle wine-glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot-dog pizza donut cake chair couch potted-plant bed dining-table toilet tv laptop mouse remote keyboard "
    "cell-phone microwave oven toaster sink refrigerator book clock vase scissors teddy-bear hair-drier toothbrush"
).split()]
MAX_QUERY_CHARS = 1000


def read_queries(path) -> list[str]:
    """One query per line (blank lines and lines starting with # skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read queries from {path}: {e.strerror if isinstance(e, OSError) else e}") from None
    queries = [q.strip() for q in lines if q.strip() and not q.lstrip().startswith("#")]
    if not queries:
        raise UserError(f"{path} holds no query (one per line)")
    too_long = next((q for q in queries if len(q) > MAX_QUERY_CHARS), None)
    if too_long:
        raise UserError(f"{path}: a query is {len(too_long)} characters long (at most {MAX_QUERY_CHARS})")
    return queries


# -- metrics (pure functions of scores) ------------------------------------------------------------

def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k highest scores (ties broken by index, as a stable sort does)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def teacher_agreement(model_scores: np.ndarray, teacher_scores: np.ndarray, k: int) -> float:
    """Mean over queries of |top-k(model) ∩ top-k(teacher)| / k; scores are [queries, images]."""
    k = min(k, model_scores.shape[1])
    ours, theirs = _topk(model_scores, k), _topk(teacher_scores, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ours, theirs)]))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank), as Spearman's rho needs."""
    out = np.empty_like(x, dtype=np.float64)
    for i, row in enumerate(x):
        order = np.argsort(row, kind="stable")
        ranks = np.empty(len(row))
        ranks[order] = np.arange(len(row))
        _, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=ranks)
        out[i] = (sums / counts)[inverse]
    return out


def rank_correlation(model_scores: np.ndarray, teacher_scores: np.ndarray) -> float:
    """Mean over queries of Spearman's rho between the two score lists."""
    a, b = _ranks(model_scores), _ranks(teacher_scores)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    rho = np.where(denom > 0, (a * b).sum(axis=1) / np.where(denom > 0, denom, 1), 0.0)
    return float(rho.mean())


def zero_shot_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """scores [classes, images]: the share of labelled images (label ≥ 0) whose best class is their label."""
    known = labels >= 0
    return float(np.mean(scores[:, known].argmax(axis=0) == labels[known]))


def precision_at_k(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Mean over classes of the share of the class prompt's top-k images that carry that class (an unlabelled
    image carries none)."""
    k = min(k, scores.shape[1])
    top = _topk(scores, k)
    return float(np.mean([(labels[row] == c).mean() for c, row in enumerate(top)]))


def compare(model_images: np.ndarray, teacher_images: np.ndarray, text: np.ndarray, queries: list[str],
            labels: np.ndarray | None = None, ks=KS) -> dict:
    """Every figure of the report from L2-normalised embeddings: model and teacher images [N, D] (same rows),
    query texts [Q, D]. With `labels` (an index into `queries` per image) the queries are the class prompts."""
    n = len(model_images)
    if n < 2:
        raise UserError(f"quality needs at least 2 readable images, got {n}")
    ours, theirs = text @ model_images.T, text @ teacher_images.T
    out = {"images": n, "queries": len(queries), "ks": list(ks), "k_effective": {str(k): min(k, n) for k in ks},
           "rank_correlation": rank_correlation(ours, theirs)}
    for k in ks:
        out[f"teacher_agreement@{k}"] = teacher_agreement(ours, theirs, k)
    if labels is not None:
        out["labelled_images"] = int((labels >= 0).sum())
        zs = {"model": zero_shot_accuracy(ours, labels), "clip": zero_shot_accuracy(theirs, labels)}
        out["zero_shot_accuracy"] = {**zs, "ratio": zs["model"] / zs["clip"] if zs["clip"] else None}
        for k in ks:
            p = {"model": precision_at_k(ours, labels, k), "clip": precision_at_k(theirs, labels, k)}
            out[f"precision@{k}"] = {**p, "ratio": p["model"] / p["clip"] if p["clip"] else None}
    return out


# -- the report ----------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    rows = [("teacher agreement@" + str(k), report[f"teacher_agreement@{k}"]) for k in report["ks"]]
    rows.append(("rank correlation (Spearman)", report["rank_correlation"]))
    lines = [f"# Text search quality: {report.get('model', 'model')} against its CLIP teacher", "",
             f"{report['images']} images ({report.get('unreadable', 0)} unreadable, skipped), "
             f"{report['queries']} queries ({report.get('queries_from', '?')}).", "",
             "| figure | value |", "| --- | --- |"]
    lines += [f"| {name} | {value:.3f} |" for name, value in rows]
    if "zero_shot_accuracy" in report:
        lines += ["", "| with labels | model | CLIP | model ÷ CLIP |", "| --- | --- | --- | --- |"]
        for key in ["zero_shot_accuracy", *[f"precision@{k}" for k in report["ks"]]]:
            v = report[key]
            ratio = "–" if v["ratio"] is None else f"{v['ratio']:.3f}"
            lines.append(f"| {key.replace('_', ' ')} | {v['model']:.3f} | {v['clip']:.3f} | {ratio} |")
    cut = {k: v for k, v in report["k_effective"].items() if int(k) != v}
    if cut:
        lines += ["", f"k cut to the number of images: {', '.join(f'{k}→{v}' for k, v in cut.items())} "
                      "(agreement is then 1 by construction: use more images)."]
    return "\n".join(lines) + "\n"


FORMAT = "dinov2clip-quality/1"


FILES = {"json": "quality.json", "markdown": "quality.md", "plot": "quality.png"}


def write_report(report: dict, out_dir) -> dict:
    """quality.json, quality.md and quality.png in `out_dir`; returns their paths. Files of those names are
    replaced only where quality.json is a report this module wrote (never someone else's files)."""
    from .report import report_files, write_files

    return write_files(report_files(out_dir, FILES, FORMAT), {"format": FORMAT, **report}, markdown(report), _plot)


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"agreement@{k}" for k in report["ks"]] + ["rank corr."]
    values = [report[f"teacher_agreement@{k}"] for k in report["ks"]] + [report["rank_correlation"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, values, color="tab:blue", label="model vs CLIP")
    if "zero_shot_accuracy" in report:
        keys = ["zero_shot_accuracy", *[f"precision@{k}" for k in report["ks"]]]
        x = np.arange(len(names), len(names) + len(keys))
        ax.bar(x - 0.2, [report[k]["model"] for k in keys], 0.4, color="tab:orange", label="model")
        ax.bar(x + 0.2, [report[k]["clip"] for k in keys], 0.4, color="tab:gray", label="CLIP")
        ax.set_xticks(list(range(len(names))) + list(x), names + [k.replace("_accuracy", "") for k in keys])
    ax.set_ylim(0, 1.05)
    ax.set_title(f"text search on your images ({report['images']} images, {report['queries']} queries)")
    ax.legend(fontsize=8)
    fig.autofmt_xdate(rotation=30)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def summary_line(report: dict) -> str:
    ks = report["ks"]
    text = ", ".join(f"agreement@{k} {100 * report[f'teacher_agreement@{k}']:.1f} %" for k in ks)
    text += f", rank corr. {report['rank_correlation']:.3f}"
    if "zero_shot_accuracy" in report:
        z = report["zero_shot_accuracy"]
        text += f", zero-shot {100 * z['model']:.1f} % (CLIP {100 * z['clip']:.1f} %)"
    return text

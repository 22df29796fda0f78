"""The evaluation report: results.json (everything), results.md (the reference's table, K always
stated) and recalls.png, written atomically; plus the teacher's check against published figures.

"% of CLIP" = 100 × ours ÷ teacher's, same dataset, direction, K, code path and data (DESIGN §6).
A bug in data loading or preprocessing that hurts both models alike cancels out in that ratio; the
teacher's own recall, checked against CLIP_benchmark's published figures, is what catches it.
"""
from __future__ import annotations

import json
from pathlib import Path

from dinov2clip.atomic import atomic_path, write_json_atomic, write_text_atomic
from dinov2clip.errors import UserError

from .metrics import DIRECTIONS

JSON_FILE, TABLE_FILE, PLOT_FILE = "results.json", "results.md", "recalls.png"
TEACHER_TOLERANCE = 1.0  # points of R@5
PUBLISHED_SOURCE = ("CLIP_benchmark benchmark/benchmark.csv (LAION-AI/CLIP_benchmark@03e7fda), "
                    "zero-shot retrieval on the Karpathy test splits")
# (open_clip architecture without -quickgelu, pretrained tag) → dataset → (text→image, image→text) R@5 in %.
# Flickr8k is left out: the published Flickr8k figures sit far below Flickr30k's for every model and
# could not be cross-checked, so a warning from them would not be trustworthy.
PUBLISHED_R5 = {
    ("ViT-B-32", "openai"): {"coco": (55.85, 74.82), "flickr30k": (83.38, 94.90)},
    ("ViT-B-16", "openai"): {"coco": (58.37, 76.82), "flickr30k": (85.54, 96.30)},
    ("ViT-L-14", "openai"): {"coco": (61.08, 79.18), "flickr30k": (87.16, 97.40)},
    ("ViT-L-14-336", "openai"): {"coco": (61.55, 81.02), "flickr30k": (88.90, 98.10)},
}


def published_teacher_r5(clip_config: dict, dataset: str) -> tuple[float, float] | None:
    """The published (text→image, image→text) R@5 of this teacher on a Karpathy test split, if any."""
    origin = clip_config.get("origin") or ""
    if "/" in origin and not origin.startswith("sha256:"):  # a bundled copy records "name/pretrained"
        name, _, pretrained = origin.rpartition("/")
    else:
        name, pretrained = clip_config.get("model_name", ""), clip_config.get("pretrained")
    return PUBLISHED_R5.get((name.removesuffix("-quickgelu"), pretrained), {}).get(dataset)


def check_teacher(clip_config: dict, dataset, recall5: dict) -> list[dict]:
    """Compare the teacher's R@5 with CLIP_benchmark's; one entry per direction when published
    (Karpathy test splits only)."""
    published = published_teacher_r5(clip_config, dataset.name) if dataset.kind == "karpathy" \
        and dataset.split == "test" else None
    if published is None:
        return []
    out = []
    for key, theirs in zip(("image_retrieval_recall@5", "text_retrieval_recall@5"), published):
        ours = 100 * recall5[key]
        out.append({"dataset": dataset.name, "metric": key, "direction": DIRECTIONS[key.split("_recall")[0]],
                    "teacher": round(ours, 2), "published": theirs, "difference": round(ours - theirs, 2),
                    "ok": abs(ours - theirs) <= TEACHER_TOLERANCE, "source": PUBLISHED_SOURCE})
    return out


def teacher_warning(check: dict) -> str:
    skipped = check.get("skipped", 0)
    note = f" ({skipped} images were skipped, which moves it)" if skipped else ""
    return (f"teacher {check['direction']} R@5 on {check['dataset']} test is {check['teacher']:.2f}, CLIP_benchmark "
            f"published {check['published']:.2f} ({check['difference']:+.2f} points, more than "
            f"{TEACHER_TOLERANCE:g}){note}: a data or preprocessing bug shared by both models would cancel "
            "out in '% of CLIP'; check the caption file, image root and split")


FILES = {"json": JSON_FILE, "table": TABLE_FILE, "plot": PLOT_FILE}


def report_files(out_dir, names: dict[str, str], fmt: str) -> dict[str, Path]:
    """A report's files in `out_dir` (`names`: key → file name, "json" among them), refused in one line where
    `out_dir` is a file or already holds a file of those names that is not a report of format `fmt`: called
    before the work, and again when writing, so a rerun replaces its own report and nothing else."""
    out = Path(out_dir)
    if out.is_file():
        raise UserError(f"--out {out} is a file: give a folder for {', '.join(names.values())}")
    files = {key: out / name for key, name in names.items()}
    if any(p.exists() for p in files.values()) and not _written_as(files["json"], fmt):
        raise UserError(f"{out} holds {', '.join(names.values())} that dinov2clip did not write: choose another --out")
    return files


def _written_as(path: Path, fmt: str) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == fmt
    except (OSError, ValueError, AttributeError):
        return False


def write_files(files: dict[str, Path], report: dict, text: str, draw) -> dict[str, str]:
    """The report as JSON, its `text` as Markdown and `draw(report, path)`'s plot, each written atomically into
    the files `report_files` gave (by suffix)."""
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            write_json_atomic(path, report)
        elif path.suffix == ".md":
            write_text_atomic(path, text)
        else:
            draw(report, path)
    return {key: str(path) for key, path in files.items()}


def write_report(report: dict, out_dir: Path) -> dict[str, str]:
    return write_files(report_files(out_dir, FILES, report["format"]), report, markdown(report), plot)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def markdown(report: dict) -> str:
    s = report["settings"]
    ks = s["ks"]
    model, teacher = report["rows"][0], report["rows"][1]
    lines = [
        "# Retrieval: dinov2clip vs its CLIP teacher", "",
        f"Model `{report['model']['source']}` (fingerprint `{report['model']['fingerprint'][:12]}`), "
        f"teacher `{report['teacher']['model_name']}/{report['teacher']['pretrained']}`. "
        f"Split `{s['split']}`, {s['dtype']} on {s['device']}.",
        f"Recall@K in %, CLIP_benchmark definitions (text→image: captions whose image is in the top K; "
        f"image→text: images with a caption in the top K); ties count against the model. "
        f"K = {', '.join(map(str, ks))}.", "",
        f"| Dataset | Direction | K | {model['name']} R@K | {teacher['name']} R@K | % of CLIP |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for ds in report["datasets"]:
        label = f"{ds['display_name']} ({ds['images']:,} images, {ds['captions']:,} captions)"
        for prefix, direction in DIRECTIONS.items():
            for k in ks:
                key = f"{prefix}_recall@{k}"
                lines.append(f"| {label} | {direction} | {k} | {100 * model['recalls'][ds['name']][key]:.2f} | "
                             f"{100 * teacher['recalls'][ds['name']][key]:.2f} | "
                             f"{_pct(model['percent_of_clip'][ds['name']][key])} |")
    if len(report["rows"]) > 2:
        lines += ["", "## All rows", "",
                  "Recall@K in %; the last column is the mean of % of CLIP over both directions and every K.", ""]
        heads = [f"{'t→i' if p == 'image_retrieval' else 'i→t'} R@{k}" for p in DIRECTIONS for k in ks]
        for ds in report["datasets"]:
            lines += [f"### {ds['display_name']}", "", "| Row | " + " | ".join(heads) + " | % of CLIP |",
                      "|---|" + "---:|" * (len(heads) + 1)]
            for row in report["rows"]:
                values = [100 * row["recalls"][ds["name"]][f"{p}_recall@{k}"] for p in DIRECTIONS for k in ks]
                lines.append(f"| {row['name']} | " + " | ".join(f"{v:.2f}" for v in values)
                             + f" | {_pct(row['mean_percent_of_clip'][ds['name']])} |")
            lines.append("")
    if report.get("selection"):
        sel = report["selection"]
        lines += ["", f"Best checkpoint by {sel['criterion']} on split `{sel['split']}`: **{sel['best']}**."]
        if sel["split"] == "test":
            lines.append("Selected on the test split: select on `--split val`, then evaluate that one checkpoint "
                         "on test.")
    skipped = [ds for ds in report["datasets"] if ds["skipped_images"]]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{ds['display_name']}: {ds['skipped_images']} images with their "
                                             f"{ds['skipped_captions']} captions" for ds in skipped) + "."]
    if report["warnings"]:
        lines += ["", "**Warnings**", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def plot_values(report: dict) -> dict:
    """What the plot draws, also stored in the PNG's metadata so it can be checked against the JSON."""
    return {ds["name"]: {row["name"]: row["recalls"][ds["name"]] for row in report["rows"]}
            for ds in report["datasets"]}


def plot(report: dict, path: Path) -> None:
    """One panel per dataset: recall against K for every row; solid text→image, dashed image→text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks, datasets = report["settings"]["ks"], report["datasets"]
    curves = [r for r in report["rows"] if r.get("epoch") is not None]
    ncols = len(datasets)
    nrows = 2 if len(curves) >= 2 else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4 * nrows), squeeze=False)
    for col, ds in enumerate(datasets):
        ax = axes[0][col]
        for i, row in enumerate(report["rows"]):
            color = "black" if row["kind"] == "teacher" else f"C{i}"
            for prefix, style in (("image_retrieval", "-"), ("text_retrieval", "--")):
                ax.plot(ks, [100 * row["recalls"][ds["name"]][f"{prefix}_recall@{k}"] for k in ks], style,
                        marker="o", color=color, label=row["name"] if prefix == "image_retrieval" else None)
        ax.set(title=f"{ds['display_name']} ({report['settings']['split']}): solid text→image, dashed image→text",
               xlabel="K", ylabel="recall@K (%)", xticks=ks)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
        if nrows == 2:
            _plot_curves(axes[1][col], ds, curves, report)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Description": json.dumps(plot_values(report))})
    plt.close(fig)


def _plot_curves(ax, ds, curves, report) -> None:
    """Per-epoch curves: recall@K of each checkpoint against its epoch, teacher as a horizontal line."""
    curves = sorted(curves, key=lambda r: r["epoch"])
    teacher = next(r for r in report["rows"] if r["kind"] == "teacher")
    for j, (prefix, k) in enumerate((p, k) for p in DIRECTIONS for k in report["settings"]["ks"]):
        key = f"{prefix}_recall@{k}"
        ax.plot([r["epoch"] for r in curves], [100 * r["recalls"][ds["name"]][key] for r in curves],
                "-" if prefix == "image_retrieval" else "--", marker=".", color=f"C{j}",
                label=f"{DIRECTIONS[prefix]} R@{k}")
        ax.axhline(100 * teacher["recalls"][ds["name"]][key], color=f"C{j}", alpha=0.3, lw=0.8)
    ax.set(title=f"{ds['display_name']}: checkpoints (faint lines: CLIP)", xlabel="epoch", ylabel="recall@K (%)")
    ax.title.set_fontsize(9)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)

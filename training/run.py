"""`python -m training.run STAGE ...`: the pipeline's entry point (DESIGN §5, §6).

    python -m training.run eval --model MODEL_DIR --karpathy dataset_coco.json --images COCO_ROOT \\
        --split test --out eval/coco

Each stage is a subcommand over one importable function (eval → `training.evaluate.evaluate`);
further stages register themselves in `STAGES`. User errors print one line and exit 2; anything
else exits 1 and names the file its traceback was logged to.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from dinov2clip.errors import UserError
from dinov2clip.presets import DEFAULT_PRESET

PROG = "python -m training.run"


def cmd_eval(args) -> None:
    from .datasets import load_folder, load_karpathy, name_uniquely
    from .evaluate import TeacherCheckWarning, evaluate
    from .report import markdown

    if len(args.karpathy) != len(args.images):
        raise UserError(f"give one --images ROOT per --karpathy FILE (got {len(args.karpathy)} and {len(args.images)})")
    if len(args.folder) != len(args.captions):
        raise UserError(f"give one --captions FILE per --folder DIR (got {len(args.folder)} and {len(args.captions)})")
    datasets = [load_karpathy(f, root, split=args.split, skip_missing=args.skip_missing)
                for f, root in zip(args.karpathy, args.images)]
    datasets += [load_folder(d, c, skip_missing=args.skip_missing) for d, c in zip(args.folder, args.captions)]
    name_uniquely(datasets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TeacherCheckWarning)  # printed below, once, as one line each
        report = evaluate(args.model, datasets, args.out, ks=args.ks, device=args.device, dtype=args.dtype,
                          batch_size=args.batch_size, checkpoints=args.checkpoint,
                          weight_averages=args.weight_average, ensembles=args.ensemble,
                          cache_dir=False if args.no_cache else args.cache, skip_missing=args.skip_missing,
                          workers=args.workers, progress=not args.quiet)
    print(markdown(report), end="")
    for w in report["warnings"]:
        print(f"{PROG}: warning: {w}", file=sys.stderr)
    print(f"wrote {', '.join(Path(p).name for p in report['files'].values())} to {args.out}")


def add_eval(sub) -> None:
    p = sub.add_parser("eval", allow_abbrev=False, help="retrieval recall@K of a model and its CLIP teacher",
                       description="Embed retrieval sets with a dinov2clip model and its CLIP teacher; write "
                                   "results.json, results.md (with % of CLIP) and recalls.png.")
    p.set_defaults(func=cmd_eval)
    p.add_argument("--model", default=DEFAULT_PRESET,
                   help=f"model directory, preset name or hf-hub:org/repo (default: {DEFAULT_PRESET})")
    p.add_argument("--karpathy", action="append", default=[], metavar="FILE",
                   help="Karpathy caption file (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json); "
                        "repeatable, each with its --images")
    p.add_argument("--images", action="append", default=[], metavar="ROOT",
                   help="image root of the matching --karpathy")
    p.add_argument("--split", default="test", help="Karpathy split, or several joined by '+' (default: test; "
                                                   "use val to select checkpoints)")
    p.add_argument("--folder", action="append", default=[], metavar="DIR",
                   help="a folder of images; repeatable, each with its --captions")
    p.add_argument("--captions", action="append", default=[], metavar="FILE",
                   help="captions of the matching --folder: .csv/.tsv/.txt (image,caption header), .json or .jsonl")
    p.add_argument("--out", required=True, metavar="DIR", help="where results.json, results.md, recalls.png go")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], metavar="K",
                   help="recall@K values (default: 1 5 10)")
    p.add_argument("--checkpoint", action="extend", nargs="+", default=[], metavar="PATH",
                   help="more projectors (.pt, .safetensors or model directories) scored on the same features; "
                        "'epoch_N' in a name places it on the per-epoch curve")
    p.add_argument("--weight-average", action="append", nargs="+", default=[], metavar="PATH",
                   help="one row for the uniform weight average of these checkpoints; repeatable")
    p.add_argument("--ensemble", action="append", nargs="+", default=[], metavar="MEMBER",
                   help="one row for the mean of these members' normalised embeddings (checkpoints, 'model' for "
                        "--model, 'clip' for the teacher); repeatable")
    p.add_argument("--skip-missing", action="store_true",
                   help="skip missing or unreadable images (and their captions) and count them in the report")
    p.add_argument("--cache", type=Path, default=None, metavar="DIR",
                   help="embedding cache (default: $DINOV2CLIP_CACHE/eval, else ~/.cache/dinov2clip/eval)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached embeddings")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="image decoding threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_precompute(args) -> None:
    from .precompute import precompute

    summary = precompute(args.model, args.shards, args.out, batch_size=args.batch_size, device=args.device,
                         dtype=args.dtype, workers=args.workers, overwrite=args.overwrite, progress=not args.quiet,
                         strict=args.strict)
    print(f"precompute: {summary}")


def add_precompute(sub) -> None:
    p = sub.add_parser("precompute", allow_abbrev=False, help="webdataset shards → per-shard float16 embeddings",
                       description="Embed webdataset shards ({key}.jpg/.txt/.json) with DINOv2 (CLS and patch mean "
                                   "separately) and the CLIP teacher (image and caption); one directory per shard "
                                   "under OUT/shards, written atomically; finished shards are skipped. Under "
                                   "torchrun each rank takes every WORLD_SIZE-th shard.")
    p.set_defaults(func=cmd_precompute)
    p.add_argument("--model", default=DEFAULT_PRESET,
                   help=f"model directory, preset or hf-hub:org/repo naming DINOv2 and the CLIP teacher "
                        f"(default: {DEFAULT_PRESET})")
    p.add_argument("--shards", nargs="+", required=True, metavar="SHARD",
                   help="tar shards: paths, globs, {00000..00099} braces or fsspec URLs (s3://, https://, ...)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4, help="image decoding threads")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: best available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--overwrite", action="store_true", help="recompute finished shards too, and replace (delete) "
                   "shards another model wrote into --out (only precompute's own shard folders are touched)")
    p.add_argument("--strict", action="store_true", help="stop at an unreadable shard (default: skip it whole, "
                   "name it, and retry it on the next run)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_train(args) -> None:
    from dataclasses import fields

    from .pipeline import load_config
    from .config import TrainConfig
    from .train import train

    opts = dict((load_config(args.config, args.set).get("train") or {}) if args.config else {})
    for f in fields(TrainConfig):
        value = getattr(args, f.name)
        if value is not None:
            opts[f.name] = value
    summary = train(TrainConfig.from_dict(opts))
    if summary:
        test = summary["metrics"].get("test")
        print(f"selected epoch {summary['selected_epoch']} on val; model: {summary['model']}"
              + (f"; test {test['recalls']}" if test else ""))


def add_train(sub) -> None:
    from dataclasses import MISSING, fields

    from .config import TrainConfig

    p = sub.add_parser("train", allow_abbrev=False, help="train a projector on precomputed embeddings",
                       description="Train a projector (AdamW + OneCycleLR; unit-norm MSE and/or InfoNCE with a "
                                   "learnable temperature; DDP under torchrun), evaluate on validation each epoch, "
                                   "export the best epoch as a model directory OUT/model. Options override "
                                   "--config's train section.")
    p.set_defaults(func=cmd_train)
    p.add_argument("--config", default=None, metavar="NAME|YAML",
                   help="a pipeline config (shipped name or YAML path); its train section is used")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        helptext = f"{f.metadata.get('help', '')} (default: {default})"
        if isinstance(default, bool):
            p.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=helptext)
        elif isinstance(default, list):
            kind = int if f.name == "ks" else str
            p.add_argument(flag, dest=f.name, default=None, nargs="+", type=kind, help=helptext)
        else:
            p.add_argument(flag, dest=f.name, default=None, type=type(default), help=helptext)


def cmd_pipeline(args) -> None:
    from .pipeline import load_config, run_pipeline

    summary = run_pipeline(load_config(args.config, args.set), args.output, progress=not args.quiet)
    if summary:
        print(f"model: {summary['model']} (epoch {summary['selected_epoch']}, selected on val)")


def add_pipeline(sub) -> None:
    p = sub.add_parser("pipeline", allow_abbrev=False, help="every stage from one YAML config",
                       description="Data (given shards, or generated shapes) → base model → precompute → train, "
                                   "from a YAML config (`--config tiny` runs offline). Rerunning resumes.")
    p.set_defaults(func=cmd_pipeline)
    p.add_argument("--config", required=True, metavar="NAME|YAML",
                   help="a shipped config (tiny: offline demo; reference: the reference recipe) or a YAML path")
    p.add_argument("--output", default=".", metavar="DIR", help="where everything goes (default: current directory)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. train.epochs=3 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def images_and_labels(args):
    """IMAGES, or a FiftyOne dataset's (or saved view's) files; labels from folders or a label field."""
    if (args.view or args.label_field) and not args.dataset:
        raise UserError("--view and --label-field need --dataset")
    if bool(args.images) == bool(args.dataset):
        raise UserError("give IMAGES (folders, files, globs) or --dataset NAME, one of the two")
    if args.label_field and args.labels:
        raise UserError("give --labels folder or --label-field, not both")
    if not args.dataset:
        return args.images, args.labels
    from fiftyone_dinov2clip.fitting import image_paths, labels_of, samples_of

    samples = samples_of(args.dataset, args.view)
    return image_paths(samples), labels_of(samples, args.label_field) if args.label_field else None


def cmd_fit(args) -> None:
    from .quality import summary_line

    if (args.producer or args.max_train_images) and not args.from_field:
        raise UserError("--producer and --max-train-images go with --from-field")
    if args.from_field:
        result = fit_from_field(args)
    else:
        result = fit_images(args)
    c, report = result["counts"], result["quality"]
    if "without_field" in c:
        print(f"fit: field {args.from_field!r}: {c['without_field']} of {c['samples']} samples without it and "
              f"{c['non_finite']} non-finite, left out")
    shards = f", {c['from_shards']} of them from {c['shards']} webdataset shards" if c.get("shards") else ""
    print(f"fit: {c['distinct'] + c.get('from_shards', 0)} images ({c['train']} train, {c['val']} held out"
          f"{shards}; {c['unreadable']} unreadable, "
          f"skipped; {c['encoded_now']} encoded now, the rest from the cache)")
    for path, why in list(result["unreadable"].items())[:5]:
        print(f"  unreadable: {path}: {why}")
    if report.get("before"):
        print(f"held-out quality before: {summary_line(report['before'])}")
    print(f"held-out quality after:  {summary_line(report)}  ({report['queries_from']})")
    print(f"model: {result['model']} (epoch {result['selected_epoch']}); report: {report['files']['markdown']}")
    if args.register:
        from fiftyone_dinov2clip.registry import register

        print(f"registered for FiftyOne as {register(args.register, result['model'])}")


def fit_options(args) -> dict:
    """What `fit` and `fit_field` both take from the command line."""
    return dict(init=args.init, from_scratch=args.from_scratch, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, hidden_dim=args.hidden_dim, num_blocks=args.num_blocks, val_percent=args.val_percent,
                queries=args.queries, template=args.template, cache=args.cache, device=args.device,
                dtype=args.dtype, encode_batch_size=args.encode_batch_size, workers=args.workers,
                overwrite=args.overwrite, seed=args.seed, progress=not args.quiet)


def fit_images(args) -> dict:
    from .fit import fit

    images, labels = images_and_labels(args)
    check_register(args)
    return fit(images, args.model, args.out, labels=labels, **fit_options(args))


def fit_from_field(args) -> dict:
    """--from-field: the projector's input is a dataset field's stored DINOv2 vectors (training/fit_field.py)."""
    from .fit_field import fit_field

    if not args.dataset or args.images:
        raise UserError("--from-field reads a FiftyOne dataset's field: give --dataset NAME and no IMAGES")
    if args.labels:
        raise UserError("--from-field takes --label-field for zero-shot labels, not --labels folder")
    check_register(args)
    return fit_field(args.dataset, args.from_field, args.model, args.out, view=args.view, producer=args.producer,
                     max_train_images=args.max_train_images, label_field=args.label_field, **fit_options(args))


def check_register(args) -> None:
    if args.register:
        from fiftyone_dinov2clip.registry import check_name

        check_name(args.register, free=True)  # before the fit: a bad or taken name would waste it


def add_fit(sub) -> None:
    p = sub.add_parser("fit", allow_abbrev=False, help="fit a projector to your own images (no captions needed)",
                       description="Fit a projector to unlabelled images: unit-norm MSE from DINOv2 to the CLIP "
                                   "teacher's image embedding. Features are cached by content (a rerun encodes "
                                   "nothing again); a killed run resumes; OUT receives a model directory.")
    p.set_defaults(func=cmd_fit)
    add_inputs(p)
    p.add_argument("--model", default=DEFAULT_PRESET,
                   help=f"the encoders (preset, model directory or hf-hub:org/repo); its projector, if it has one, "
                        f"is the starting point (default: {DEFAULT_PRESET})")
    p.add_argument("--out", required=True, metavar="DIR", help="the model directory to write")
    p.add_argument("--init", default=None, metavar="SOURCE", help="start from this model's projector instead")
    p.add_argument("--from-scratch", action="store_true", help="start from random weights")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256, help="training batch (projector steps)")
    p.add_argument("--lr", type=float, default=1e-3, help="OneCycleLR peak learning rate")
    p.add_argument("--hidden-dim", type=int, default=2048, help="projector width (from scratch)")
    p.add_argument("--num-blocks", type=int, default=6, help="projector residual blocks (from scratch)")
    p.add_argument("--val-percent", type=float, default=10.0, help="share of images held out to select the epoch "
                                                                   "and report quality (default: 10)")
    add_query_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a model directory")
    p.add_argument("--register", default=None, metavar="NAME", help="register the model for FiftyOne as NAME")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-field", default=None, metavar="FIELD",
                   help="the DINOv2 embeddings stored in this field of --dataset are the projector's input; CLIP "
                        "reads only the training sample's images, and the model indexes the dataset from the field")
    p.add_argument("--producer", default=None, metavar="ZOO_MODEL",
                   help="with --from-field: the FiftyOne zoo model that wrote the field (e.g. dinov2-vitb14-torch), "
                        "when the field does not record it; it embeds new samples")
    p.add_argument("--max-train-images", type=int, default=None, metavar="N",
                   help="with --from-field: train on a seeded sample of at most N of the samples with the field")
    add_encode_options(p)


def add_inputs(p) -> None:
    p.add_argument("images", nargs="*", metavar="IMAGES", help="image folders (recursive), files or globs; for fit "
                   "also webdataset shards (.tar, 'a/{00000..00009}.tar', fsspec URLs: captions unused)")
    p.add_argument("--dataset", default=None, metavar="NAME", help="a FiftyOne dataset's images instead")
    p.add_argument("--view", default=None, metavar="NAME", help="a saved view of --dataset")
    p.add_argument("--label-field", default=None, metavar="FIELD",
                   help="a Classification field of --dataset: classes for zero-shot accuracy and precision@k")


def add_query_options(p) -> None:
    p.add_argument("--queries", default=None, metavar="FILE", help="query texts, one per line (default: a built-in "
                                                                   "general vocabulary, or the label classes)")
    p.add_argument("--labels", default=None, choices=["folder"],
                   help="folder: each image's class is its parent folder's name (zero-shot accuracy, precision@k)")
    p.add_argument("--template", default="a photo of a {}", help="query for a class or vocabulary word")


def add_encode_options(p) -> None:
    p.add_argument("--cache", type=Path, default=None, metavar="DIR",
                   help="feature cache (default: $DINOV2CLIP_CACHE/fit, else ~/.cache/dinov2clip/fit)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--encode-batch-size", type=int, default=32, help="images per encoder batch")
    p.add_argument("--workers", type=int, default=4, help="image decoding threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_quality(args) -> None:
    from .fit import quality
    from .quality import summary_line

    images, labels = images_and_labels(args)
    report = quality(images, args.model, args.out, queries=args.queries, template=args.template,
                     labels=labels, max_images=args.max_images, cache=args.cache, device=args.device,
                     dtype=args.dtype, encode_batch_size=args.encode_batch_size, workers=args.workers,
                     seed=args.seed, progress=not args.quiet)
    sampled = report["sampled"]
    print(f"quality: {report['images']} images" + (f" (a sample of {sampled['of']})" if sampled else "") +
          f", {report['unreadable']} unreadable, {report['queries']} queries ({report['queries_from']})")
    print(f"{summary_line(report)}")
    print(f"wrote {', '.join(Path(p).name for p in report['files'].values())} to {args.out}")


def add_quality(sub) -> None:
    p = sub.add_parser("quality", allow_abbrev=False, help="text search quality on your images, against CLIP",
                       description="Compare a model with its CLIP teacher on your images: teacher agreement@10/@50 "
                                   "(% of CLIP on your data), rank correlation, and with labels zero-shot accuracy "
                                   "and precision@k side by side. Writes quality.json, quality.md, quality.png.")
    p.set_defaults(func=cmd_quality)
    add_inputs(p)
    p.add_argument("--model", default=DEFAULT_PRESET, help="the model to judge (preset, directory, hf-hub:)")
    p.add_argument("--out", required=True, metavar="DIR", help="where quality.json, .md and .png go")
    p.add_argument("--max-images", type=int, default=5000, help="a seeded sample when there are more")
    p.add_argument("--seed", type=int, default=0)
    add_query_options(p)
    add_encode_options(p)


STAGES = {"fit": add_fit, "quality": add_quality, "eval": add_eval, "precompute": add_precompute, "train": add_train,
          "pipeline": add_pipeline}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, allow_abbrev=False,
                                     description="dinov2clip training pipeline: " + ", ".join(STAGES) +
                                     ". `--config tiny` (a shipped name or a YAML path) alone runs the whole "
                                     "pipeline.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for add in STAGES.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dinov2clip.cli import run  # the console script's error handling and crash log, shared

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--config":  # `python -m training.run --config tiny`: the whole pipeline
        argv = ["pipeline", *argv]
    return run(build_parser(), argv, PROG)


if __name__ == "__main__":
    sys.exit(main())

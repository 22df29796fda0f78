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
    if Path(args.out).is_file():
        raise UserError(f"--out must be a directory, {args.out} is a file")
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
    from .train import TrainConfig, train

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

    from .train import TrainConfig

    p = sub.add_parser("train", allow_abbrev=False, help="train a projector on precomputed embeddings",
                       description="Train a projector (AdamW + OneCycleLR; unit-norm MSE and/or InfoNCE with a "
                                   "learnable temperature; DDP under torchrun), evaluate on validation each epoch, "
                                   "export the best epoch as a model directory OUT/model. Options override "
                                   "--config's train section.")
    p.set_defaults(func=cmd_train)
    p.add_argument("--config", default=None, metavar="YAML", help="a pipeline config; its train section is used")
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
                                   "from a YAML config (training/configs/tiny.yaml runs offline). Rerunning resumes.")
    p.set_defaults(func=cmd_pipeline)
    p.add_argument("--config", required=True, metavar="YAML")
    p.add_argument("--output", default=".", metavar="DIR", help="where everything goes (default: current directory)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. train.epochs=3 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_planted(args) -> None:
    import json

    from .planted import run_planted

    print(json.dumps(run_planted(args.out, n_train=args.n_train, n_eval=args.n_eval, in_dim=args.in_dim,
                                 out_dim=args.out_dim, hidden=args.hidden, epochs=args.epochs,
                                 batch_size=args.batch_size, lr=args.lr, proj_hidden=args.proj_hidden,
                                 num_blocks=args.num_blocks, seed=args.seed, progress=not args.quiet,
                                 losses=args.losses), indent=2))


def add_planted(sub) -> None:
    p = sub.add_parser("planted", allow_abbrev=False, help="planted-alignment check of the trainer; prints figures",
                       description="Generate a planted alignment (random 3-layer GELU+LayerNorm MLP + noise, true "
                                   "map recall@1 ~0.6), train on it with the MSE and the contrastive loss, print "
                                   "recall@1 of the true map, ridge regression, the trainer, and the share of its "
                                   "true map a linear map reaches with as many pairs (is the bar reachable?).")
    p.set_defaults(func=cmd_planted)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--n-train", type=int, default=200_000)
    p.add_argument("--n-eval", type=int, default=5_000, help="validation and test pairs (recall candidates)")
    p.add_argument("--in-dim", type=int, default=768)
    p.add_argument("--out-dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512, help="width of the planted MLP")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--proj-hidden", type=int, default=1024, help="trained projector width")
    p.add_argument("--num-blocks", type=int, default=2, help="trained projector residual blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--losses", nargs="+", default=["mse", "contrastive"],
                   choices=["mse", "contrastive", "contrastive-both"],  # planted.LOSSES, named here without torch
                   help="losses to train (default: mse contrastive); contrastive is InfoNCE's text→image half, "
                        "contrastive-both CLIP's symmetric form")
    p.add_argument("--quiet", action="store_true")


STAGES = {"eval": add_eval, "precompute": add_precompute, "train": add_train, "pipeline": add_pipeline,
          "planted": add_planted}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, allow_abbrev=False,
                                     description="dinov2clip training pipeline: " + ", ".join(STAGES) +
                                     ". `--config X.yaml` alone runs the whole pipeline.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for add in STAGES.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dinov2clip.cli import run  # the console script's error handling and crash log, shared

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--config":  # `python -m training.run --config X.yaml`: the whole pipeline
        argv = ["pipeline", *argv]
    return run(build_parser(), argv, PROG)


if __name__ == "__main__":
    sys.exit(main())

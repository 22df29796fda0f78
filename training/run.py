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
    from .datasets import load_folder, load_karpathy
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
    seen: dict[str, int] = {}
    for ds in datasets:  # the same file twice, or two folders named alike: coco, coco-2...
        seen[ds.name] = seen.get(ds.name, 0) + 1
        if seen[ds.name] > 1:
            ds.name = f"{ds.name}-{seen[ds.name]}"
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


STAGES = {"eval": add_eval}  # precompute and train register here


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, allow_abbrev=False,
                                     description="dinov2clip training pipeline: " + ", ".join(STAGES))
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for add in STAGES.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dinov2clip.cli import run  # the console script's error handling and crash log, shared

    return run(build_parser(), argv, PROG)


if __name__ == "__main__":
    sys.exit(main())

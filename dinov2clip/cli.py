"""`dinov2clip` console script. Each subcommand is a small function over the public API.

User errors print one line and exit 2; unexpected errors exit 1 and name the logged traceback."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

from . import identity
from .atomic import environment_errno
from .errors import UserError
from .presets import DEFAULT_PRESET

PROG = "dinov2clip"
OVERWRITE_HELP = ("replace OUT_DIR if it is a model directory dinov2clip wrote (config.json, weights, bundled "
                  "parts and nothing else); any other non-empty folder is refused")


def cmd_info(args) -> None:
    from .factory import resolve_source

    config, root = resolve_source(args.source)
    info = {"source": args.source, "directory": str(root) if root else None, **config.to_dict(),
            "encoder_fingerprint": identity.encoders(config)}
    if identity.known_model(config):
        info["fingerprint"] = identity.known_model(config)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    d, c, p = config.dinov2, config.clip, config.projector
    dims = "→".join(str(p.get(k) or "?") for k in ("input_dim", "hidden_dim", "output_dim"))
    print(f"source      {args.source}" + (f"  ({root})" if root else "  (preset)"))
    print(f"dinov2      {d.get('origin') or d['source']}  pooling={d['pooling']}" + ("  [bundled]" if d.get("path") else ""))
    print(f"clip        {c['model_name']} / {c.get('pretrained')}" + ("  [bundled]" if c.get("path") else ""))
    print(f"projector   {dims} ×{p.get('num_blocks') or '?'} blocks  {p.get('path') or p.get('source')}")
    print(f"license     {config.license}")
    print(f"format      {config.format_version}")
    print(f"encoders    {info['encoder_fingerprint']}")
    if "fingerprint" in info:
        print(f"fingerprint {info['fingerprint']}")
    if config.provenance:
        print(f"provenance  {json.dumps(config.provenance, sort_keys=True)}")


def cmd_make_tiny(args) -> None:
    from .modeldir import make_tiny

    print(make_tiny(args.out_dir, seed=args.seed, pooling=args.pooling, overwrite=args.overwrite, size=args.size))


def cmd_convert_reference(args) -> None:
    from .modeldir import convert_reference

    print(convert_reference(args.checkpoint, args.out_dir, args.dinov2, args.pooling, args.clip, args.pretrained,
                            license=args.license, overwrite=args.overwrite))


def cmd_bundle(args) -> None:
    from .modeldir import bundle

    print(bundle(args.source, args.out_dir, overwrite=args.overwrite))


def cmd_push(args) -> None:
    from .hub import push

    print(push(args.model_dir, args.repo_id, private=args.private, echo=print))


def _load(args, image: bool = True, text: bool = True):
    from .factory import load

    return load(args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                image=image, text=text, projector=args.projector)


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (a bad value is argparse's one-line error, exit 2, before any work)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_embed(args) -> None:
    from .embed import embed_files, expand_images, load_embeddings, save_embeddings

    out = Path(args.out)  # checked before the work, not after it
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give a file path such as {out / 'embeddings.npz'}")
    if out.exists():  # replaced only when it is an embeddings file of ours
        try:
            load_embeddings(out)
        except UserError:
            raise UserError(f"--out {out} exists and is not a dinov2clip embeddings file: refusing to overwrite "
                            "it") from None
    paths = expand_images(args.images)
    if not paths:
        raise UserError("no images found in " + " ".join(args.images))
    model = _load(args, text=False)
    emb, kept, failures = embed_files(model, paths, workers=args.workers, progress=not args.quiet)
    for path, msg in failures:
        print(f"skipped: {msg}", file=sys.stderr)
    model_ref = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    save_embeddings(Path(args.out), emb, [str(p) for p in kept],
                    {"model": model_ref, "projector": args.projector, "fingerprint": model.fingerprint,
                     "embed_dim": model.embed_dim,
                     "skipped": len(failures), "created": datetime.datetime.now().isoformat(timespec="seconds")})
    print(f"embedded {len(kept)} images, skipped {len(failures)} unreadable → {args.out}")


def cmd_search(args) -> None:
    import torch

    from .embed import load_embeddings
    from .factory import load_encoders, resolve_source

    if args.explain and Path(args.explain).exists() and not Path(args.explain).is_dir():
        raise UserError(f"--explain {args.explain} is a file: give a folder for the overlays")
    emb, items, meta = load_embeddings(Path(args.file))
    args.model = args.model or meta["model"]
    args.projector = args.projector or meta.get("projector")
    fingerprint = None if args.projector else identity.known_model(resolve_source(args.model)[0])
    if fingerprint and not args.explain:  # a model directory names its projector: the text tower suffices
        model = load_encoders(args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                              image=False)
    else:  # a preset's projector is known once fetched; maps need the image tower
        model = _load(args, image=bool(args.explain))
        fingerprint = model.fingerprint
    if fingerprint != meta["fingerprint"]:
        raise UserError(f"{args.file} was embedded with another model (fingerprint {meta['fingerprint'][:12]}, "
                        f"{meta['model']}); {args.model} is {fingerprint[:12]}: re-embed or pass its --model")
    if len(items) == 0:
        raise UserError(f"{args.file} holds no embeddings")
    query = model.encode_text([args.query])[0]
    if len(args.query) > model.text_limit:
        print(f"note: the query was cut to its first {model.text_limit:,} of {len(args.query):,} characters "
              "(all the text tower reads)", file=sys.stderr)
    scores = torch.from_numpy(emb) @ query
    top = torch.topk(scores, min(args.k, len(items)))
    for score, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"{score:.4f}\t{items[i]}")
    if args.explain:
        explain_hits(model, [items[i] for i in top.indices.tolist()], args.query, Path(args.explain), args.method)


def explain_hits(model, images: list[str], query: str, out_dir: Path, method: str | None) -> None:
    """An overlay per hit, `NN-<name>.png` in `out_dir` (rank first); an unreadable hit is named and skipped."""
    from .heatmap import DEFAULT_METHOD, check_overlay_path, save_overlay

    method = method or DEFAULT_METHOD
    outs = [out_dir / f"{rank:02d}-{Path(image).stem}.png" for rank, image in enumerate(images, 1)]
    for out in outs:  # every name checked before any map is made
        check_overlay_path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = {}
    maps = model.heatmap(images, query, method=method, on_error=lambda i, msg: failed.setdefault(i, msg))
    for i, (image, heatmap, out) in enumerate(zip(images, maps, outs)):
        if heatmap is None:
            print(f"skipped: {failed[i]}", file=sys.stderr)
            continue
        save_overlay(out, image, heatmap, query, method)
        print(f"heatmap\t{out}")


def cmd_explain(args) -> None:
    from .heatmap import DEFAULT_METHOD, check_overlay_path, save_overlay

    check_overlay_path(args.out)
    if not Path(args.image).is_file():
        raise UserError(f"no such image file: {args.image}")
    model = _load(args)
    method = args.method or DEFAULT_METHOD

    def unreadable(i, msg):
        raise UserError(msg)

    (heatmap,) = model.heatmap([args.image], args.query, method=method, max_side=args.max_side, on_error=unreadable)
    save_overlay(args.out, args.image, heatmap, args.query, method)
    print(args.out)


def heatmap_method(text: str) -> str:
    """argparse type: a heatmap method's name (torch is imported only when the flag is given)."""
    from .heatmap import METHODS

    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"{text!r}: choose one of {', '.join(METHODS)}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Text search over DINOv2 image embeddings.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help):
        p = sub.add_parser(name, help=help, description=help, allow_abbrev=False)
        p.set_defaults(func=func)
        return p

    def model_options(p, required_model=True):
        p.add_argument("--model", default=DEFAULT_PRESET if required_model else None,
                       help=f"model directory, preset name or hf-hub:org/repo (default: {DEFAULT_PRESET}"
                            + ("" if required_model else "; search: the model recorded in FILE") + ")")
        p.add_argument("--projector", default=None, metavar="PATH",
                       help="use this projector (.pt/.safetensors file, model directory, URL or hf-hub:) with "
                            "the model's encoders" + ("" if required_model else "; search: the one recorded in FILE"))
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
        p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
        p.add_argument("--batch-size", type=int, default=32)

    p = add("info", cmd_info, "show a model's configuration without loading weights")
    p.add_argument("source", help="model directory, preset name or hf-hub:org/repo")
    p.add_argument("--json", action="store_true")

    p = add("make-tiny", cmd_make_tiny, "write a random tiny model directory (offline; for tests and demos)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pooling", default="mean", choices=["mean", "cls", "cls+mean"])
    p.add_argument("--size", default="tiny", choices=["tiny", "reference"],
                   help="reference: real-size architectures (dinov2-base, ViT-B/16, 768→2048×6→512) for benchmarks")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = add("convert-reference", cmd_convert_reference, "turn a reference .pt projector into a model directory")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--dinov2", required=True, help="DINOv2 hub id or alias (small, base, large, giant, base-reg...)")
    p.add_argument("--pooling", required=True, choices=["mean", "cls", "cls+mean"])
    p.add_argument("--clip", required=True, help="open_clip model name (e.g. ViT-B-16-quickgelu) or B/32, B/16, L/14")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (e.g. openai)")
    p.add_argument("--license", default="unknown")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = add("bundle", cmd_bundle, "copy a model and all its weights into one self-contained offline directory")
    p.add_argument("source")
    p.add_argument("out_dir")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = add("push", cmd_push, "upload a model directory to the Hugging Face Hub with a generated model card")
    p.add_argument("model_dir")
    p.add_argument("repo_id", help="org/repo")
    p.add_argument("--private", action="store_true")

    p = add("embed", cmd_embed, "embed image files and folders; unreadable images are skipped and counted")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--workers", type=int, default=None, help="image decoding threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    model_options(p)

    p = add("search", cmd_search, "rank embedded images by similarity to a text query")
    p.add_argument("file", help="an .npz written by `dinov2clip embed`")
    p.add_argument("query")
    p.add_argument("-k", type=positive_int, default=10, help="how many matches to print [%(default)s]")
    p.add_argument("--explain", metavar="DIR", default=None,
                   help="also write a heatmap overlay of each hit into DIR (NN-<name>.png): where it matches the query")
    p.add_argument("--method", type=heatmap_method, default=None,
                   help="heatmap method: gradient, patch or smoothed (default: smoothed)")
    model_options(p, required_model=False)

    p = add("explain", cmd_explain, "write a heatmap overlay: which parts of an image match a text")
    p.add_argument("image", help="an image file")
    p.add_argument("query")
    p.add_argument("--out", required=True, help="the overlay to write (.png)")
    p.add_argument("--method", type=heatmap_method, default=None,
                   help="heatmap method: gradient, patch or smoothed (default: smoothed)")
    p.add_argument("--max-side", type=positive_int, default=None,
                   help="longest side of the overlay in pixels (default: the image's size)")
    model_options(p)
    return parser


def _log_crash() -> str:
    log_dir = Path(os.environ.get("DINOV2CLIP_LOG_DIR") or Path(tempfile.gettempdir()) / "dinov2clip-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"crash-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    path.write_text(" ".join(sys.argv) + "\n\n" + traceback.format_exc())
    return str(path)


def run(parser: argparse.ArgumentParser, argv: list[str] | None, prog: str = PROG) -> int:
    """Parse (argparse exits 2 on bad flags, before any work), run `args.func`, map errors to exit codes:
    UserError or an unwritable or full disk → one line, 2; Ctrl-C → 130; anything else → one line naming the
    logged traceback, 1."""
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        code = environment_errno(e)  # a read-only or unwritable folder, a full disk: the user's to fix
        if code is None:
            return _unexpected(e, prog)
        where = " → ".join(str(f) for f in (getattr(e, "filename", None), getattr(e, "filename2", None)) if f)
        print(f"{prog}: error: {where or 'writing'}: {os.strerror(code)}", file=sys.stderr)
        return 2
    return 0


def _unexpected(e: Exception, prog: str) -> int:
    """Anything else is our bug: keep the traceback, show one line."""
    print(f"{prog}: unexpected error: {type(e).__name__}: {e} (traceback logged to {_log_crash()})",
          file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

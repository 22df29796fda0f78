"""The whole pipeline from one YAML config: data → base model → precompute → train.

    python -m training.run --config tiny --output runs/tiny
    python -m training.run --config tiny --set train.epochs=3 --output runs/short
    python -m training.run --config my-recipe.yaml --output runs/mine

`--config` takes a shipped config by name (training/configs/NAME.yaml: tiny, reference) or a path to a YAML file.
Config sections:
  data:      {shapes: {train: N, val: N, test: N, per_shard: N, seed: S, image_size: PX}}  — generated — or
             {train: [SHARDS...], val: [SHARDS...], test: [SHARDS...]}  (paths, globs, {a..b} braces, fsspec URLs)
  model:     {make_tiny: {seed: S, pooling: P}}  or  {source: MODEL_DIR | PRESET | hf-hub:org/repo}
  precompute: options of the precompute stage (batch_size, workers, device, dtype)
  train:     options of the train stage (`python -m training.run train --help`); relative val_karpathy and
             val_images paths are under --output too
Every stage skips work already done (finished shards, an existing base model, a finished training run),
so rerunning the command resumes. Relative paths are under --output.
"""
from __future__ import annotations

import copy
from pathlib import Path

from dinov2clip.errors import UserError, first_line

from .rerun import record_or_check

SECTIONS = ("name", "data", "model", "precompute", "train")
CONFIG_RECORD = "pipeline-config.json"  # the config a --output was made with: a changed one is refused
OUTPUTS = ("data", "base_model", "precomputed", "train")
SPLITS = ("train", "val", "test")


CONFIGS = Path(__file__).parent / "configs"  # shipped in the wheel (pyproject's package-data)


def config_path(spec) -> Path:
    """A shipped config's name (`tiny`: no folder, no .yaml) or a path. A bare name is always a shipped
    config, so a folder named `tiny` beside you never changes what `--config tiny` means; write ./tiny for it."""
    spec = str(spec)
    if "/" in spec or "\\" in spec or spec.endswith((".yaml", ".yml")):
        return Path(spec).expanduser()
    if (CONFIGS / f"{spec}.yaml").is_file():
        return CONFIGS / f"{spec}.yaml"
    shipped = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
    raise UserError(f"unknown config {spec!r}: shipped configs are {shipped}; give a path to a YAML file "
                    f"(./{spec}) for your own")


def load_config(spec, overrides=()) -> dict:
    import yaml

    path = config_path(spec)
    try:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"config not found: {path}") from None
    except OSError as e:  # a folder of that name, no permission: one line, like a missing file
        raise UserError(f"cannot read config {path}: {e.strerror or type(e).__name__}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({first_line(e)})") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set wants KEY=VALUE (e.g. train.epochs=3), got {item!r}")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {p} is not a section")
        node[leaf] = yaml.safe_load(value)
    unknown = sorted(set(cfg) - set(SECTIONS))
    if unknown:
        raise UserError(f"{path}: unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    return cfg


def run_pipeline(cfg: dict, output, progress: bool = True) -> dict:
    from .precompute import precompute
    from .config import TrainConfig
    from .train import train

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    record = cfg
    if "shapes" in (cfg.get("data") or {}):  # the shards on disk were drawn by this code: part of the config
        from .synthetic import VERSION

        if VERSION != 1:  # 1 goes unrecorded: runs recorded before the version was drew version 1's pictures
            record = {**cfg, "shapes_version": VERSION}
    record_or_check(out / CONFIG_RECORD, record, f"--output {out}", "use a new --output to start over",
                    made=any((out / part).exists() for part in OUTPUTS))
    shards = prepare_data(cfg.get("data") or {}, out)
    model = prepare_model(cfg.get("model") or {}, out)
    pre = dict(cfg.get("precompute") or {})
    for split, specs in shards.items():
        print(f"precompute {split}: {precompute(model, specs, out / 'precomputed' / split, progress=progress, **pre)}",
              flush=True)
    train_opts = dict(cfg.get("train") or {})
    train_opts.setdefault("recipe", cfg.get("name", "pipeline"))
    for key in ("val_karpathy", "val_images"):  # relative paths are under --output, like the shards
        if train_opts.get(key):
            train_opts[key] = [_under(out, str(x)) for x in train_opts[key]]
    tc = TrainConfig.from_dict({"train": [str(out / "precomputed" / "train")], "val": [str(out / "precomputed" / "val")],
                                "test": [str(out / "precomputed" / "test")] if "test" in shards else [],
                                "out": str(out / "train"), "model_source": model, "progress": progress, **train_opts})
    if (out / "train" / "summary.json").is_file() and not tc.resume:
        import json

        print(f"training already finished: {out / 'train' / 'summary.json'}")
        return json.loads((out / "train" / "summary.json").read_text())
    tc.resume = True  # rerunning the pipeline continues an interrupted training
    return train(tc)


def prepare_data(data: dict, out: Path) -> dict[str, list[str]]:
    from .synthetic import write_shapes_shards

    if "shapes" in data:
        opts = dict(data["shapes"])
        per_shard, seed, size = opts.get("per_shard", 500), opts.get("seed", 0), opts.get("image_size", 64)
        result = {}
        for i, split in enumerate(SPLITS):
            n = opts.get(split, 0)
            if not n:
                continue
            root = out / "data" / split
            if not root.is_dir() or not any(root.glob("*.tar")):
                write_shapes_shards(root, n, per_shard, seed=seed + 1000 * i, size=size, prefix=split,
                                    corrupt=opts.get("corrupt", 0) if split == "train" else 0,
                                    **{k: tuple(opts[k]) for k in ("scale", "backgrounds") if k in opts})
            result[split] = [str(p) for p in sorted(root.glob("*.tar"))]
        return result
    missing = [s for s in ("train", "val") if not data.get(s)]
    if missing:
        raise UserError(f"data: give shards for {', '.join(missing)} (or a 'shapes' section to generate them)")
    return {s: [_under(out, x) for x in ([data[s]] if isinstance(data[s], str) else data[s])]
            for s in SPLITS if data.get(s)}


def _under(out: Path, spec: str) -> str:
    return spec if "://" in spec or Path(spec).is_absolute() else str(out / spec)


def prepare_model(model: dict, out: Path) -> str:
    if "make_tiny" in model:
        from dinov2clip.modeldir import make_tiny

        opts = dict(model["make_tiny"] or {})
        path = out / "base_model"
        if not (path / "config.json").is_file():
            make_tiny(str(path), seed=opts.get("seed", 0), pooling=opts.get("pooling", "mean"))
        return str(path)
    if "source" in model:
        src = str(model["source"])
        return _under(out, src) if ("/" in src and ":" not in src and not Path(src).is_absolute()
                                    and (out / src).exists()) else src
    raise UserError("model: give 'source: MODEL' or 'make_tiny: {...}'")

"""A projector fitted to your own images, no captions needed (DESIGN §8).

    python -m training.run fit photos/ 'more/*.jpg' --model reference --out my-model
    python -m training.run quality photos/ --model my-model --out my-model-quality

The objective is the reference's: unit-norm MSE from the pooled DINOv2 embedding to the CLIP teacher's
image embedding, so any images are training data. In order:
1. images → their content hashes; a fixed share is held out for validation, chosen by hash, so an image is
   on the same side in every run;
2. features: each split's images in content-defined chunks (a chunk ends after an image whose hash says so,
   so adding images changes only the chunks they fall into), each chunk one precompute shard written by
   precompute's own decode/encode path (`precompute_shard`) into a cache keyed by the encoders' towers,
   dtype and device type, and named by the chunk's content: a rerun, or another fit or quality report over
   the same images, encodes nothing again, and a killed run loses at most the chunk it was encoding;
3. the train stage (MSE only, the best validation epoch selected) in a run directory named by everything it
   depends on, so a killed run resumes from its last epoch;
4. that epoch → the model directory OUT (provenance: image-set manifest, counts, recipe, init), and the
   quality report on the held-out images (before and after, when it started from a projector).
"""
from __future__ import annotations

import glob
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dinov2clip import identity
from dinov2clip.errors import UserError

from . import quality as q

CHUNK = 256  # mean images per cached feature shard
FIT_VERSION = 2  # bump when the features this module stores change meaning (2: the teacher in fp32 on CPU)
VAL_PERCENT = 10.0  # images held out by default (by hash) to select the epoch and report quality


@dataclass
class Images:
    """The readable image files of the inputs, by content hash, in hash order (duplicates kept once)."""
    paths: dict[str, Path]  # sha256 → first path seen with that content
    unreadable: dict[str, str] = field(default_factory=dict)  # path → why
    given: int = 0

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256("".join(sorted(self.paths)).encode()).hexdigest()


def find_images(inputs) -> list[Path]:
    """Folders (recursively, the core's walker), image files and globs."""
    from dinov2clip.embed import expand_images

    found = []
    for item in inputs:
        item = str(item)
        if not Path(item).exists() and any(c in item for c in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"no file matches {item!r}")
            found += expand_images(matches)
        else:
            found += expand_images([item])
    return found


def hash_images(paths: list[Path]) -> Images:
    images = Images({}, given=len(paths))
    for path in paths:
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as e:
            images.unreadable[str(path)] = e.strerror or type(e).__name__
            continue
        images.paths.setdefault(digest, path)
    images.paths = dict(sorted(images.paths.items()))
    return images


def split(images: Images, val_percent: float) -> tuple[list[str], list[str]]:
    """(train, val) hashes: an image is held out when its hash says so (at least one image)."""
    hashes = list(images.paths)
    val = [h for h in hashes if held_out(h, val_percent)]
    if not val and val_percent > 0:
        val = hashes[-1:]
    held = set(val)
    return [h for h in hashes if h not in held], val


def held_out(digest: str, val_percent: float) -> bool:
    """Whether an image (by the sha256 of its bytes) is held out: the same answer in every run."""
    return int(digest[:8], 16) % 10_000 < val_percent * 100


def chunks(hashes: list[str]) -> list[list[str]]:
    """Content-defined chunks of a hash-sorted list: a chunk ends after a hash whose value says so."""
    out, cur = [], []
    for h in hashes:
        cur.append(h)
        if int(h[8:16], 16) % CHUNK == 0:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def chunk_name(members: list[str]) -> str:
    return "fit-" + hashlib.sha256("".join(members).encode()).hexdigest()[:24]


# -- features --------------------------------------------------------------------------------------

def feature_dir(source: str, device: str | None, dtype: str, cache: Path | None) -> Path:
    """The feature cache of these encoders' towers at this dtype and device type (what changes the numbers)."""
    from dinov2clip.factory import towers_of
    from dinov2clip.model import default_device, resolve_dtype
    from dinov2clip.sources import cache_dir


    kind = torch.device(device or default_device()).type
    resolved = str(resolve_dtype(dtype, kind)).removeprefix("torch.")
    root = Path(cache) if cache else cache_dir() / "fit"
    return root / "features" / f"{towers_of(source)[:24]}-{kind}-{resolved}-v{FIT_VERSION}"


class Encoding:
    """Encoders loaded only when some chunk is not cached yet; counts what was encoded."""

    def __init__(self, source: str, device, dtype, batch_size: int, workers: int, progress: bool):
        self.source, self.device, self.dtype = source, device, dtype
        self.batch_size, self.workers, self.progress = batch_size, workers, progress
        self.encoders = None
        self.encoded = 0

    def shard(self, features: Path, name: str, members: list[str], images: Images, bar) -> None:
        def samples():
            for h in members:
                path = images.paths[h]
                try:
                    data = path.read_bytes()
                except OSError as e:  # gone or unreadable since it was hashed: recorded as skipped
                    data = f"unreadable: {e.strerror}".encode()
                yield {"__key__": h, path.suffix.lower().lstrip(".") or "jpg": data}

        self.write(features, name, samples(), bar)

    def write(self, features: Path, name: str, samples, bar, url: str | None = None) -> None:
        """One cached shard from `samples` (dicts in webdataset's layout), through precompute's own path."""
        from .precompute import precompute_shard

        if self.encoders is None:
            from dinov2clip import load_encoders

            self.encoders = load_encoders(self.source, device=self.device, dtype=self.dtype,
                                          batch_size=self.batch_size, teacher=True)
        meta = precompute_shard(self.encoders, url or name, features, self.batch_size, self.workers, bar,
                                source=self.source, samples=samples, name=name, captioned=False)
        self.encoded += meta_count(features, name) + meta["skipped"]


# -- webdataset shards (captions, if any, are not used) ---------------------------------------------

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_shard(item) -> bool:
    item = str(item)
    return item.endswith(SHARD_SUFFIXES) or "://" in item or ("{" in item and ".." in item)


def encode_shards(urls: list[str], features: Path, encoding: Encoding, val_percent: float) -> tuple[list, list]:
    """Each shard as two cached chunks, its held-out images (by the hash of their bytes, as for files) and the
    rest, named by the hash of the shard's bytes. A shard's first read hashes it; each missing chunk reads it
    again and keeps its side's samples."""
    import fsspec
    from tqdm.auto import tqdm

    from .precompute import IMAGE_EXTS, UnreadableShard, read_samples
    from .shards import clean_partial, is_done

    def side_of(sample) -> str:
        data = next((sample[e] for e in IMAGE_EXTS if e in sample), b"")
        return "val" if held_out(hashlib.sha256(data).hexdigest(), val_percent) else "train"

    names = {"train": [], "val": []}
    for url in urls:
        digest = hashlib.sha256()
        try:
            with fsspec.open(url, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
        except OSError as e:
            raise UserError(f"cannot read shard {url}: {e.strerror or type(e).__name__}") from None
        base = f"fit-wds-{digest.hexdigest()[:24]}"
        clean_partial(features, [f"{base}-train", f"{base}-val"])
        for side in ("train", "val"):
            name = f"{base}-{side}"
            if not is_done(features, name):
                with tqdm(desc=f"encode {Path(url).name} ({side})", unit="img", disable=not encoding.progress) as bar:
                    try:
                        encoding.write(features, name, (s for s in read_samples(url) if side_of(s) == side), bar,
                                       url=url)
                    except UnreadableShard as e:
                        raise UserError(str(e)) from None
            names[side].append(name)
    return names["train"], names["val"]


def encode(images: Images, hashes: list[str], features: Path, encoding: Encoding) -> list[str]:
    """Make sure every chunk of `hashes` is a finished shard under `features`; returns the chunks' names."""
    return encode_chunks(hashes, features, chunk_name,
                         lambda name, members, bar: encoding.shard(features, name, members, images, bar),
                         "encode images (DINOv2 + CLIP teacher)", encoding.progress)


def encode_chunks(hashes: list[str], features: Path, name_of, write, desc: str, progress: bool) -> list[str]:
    """The chunks of `hashes`, named by `name_of(members)`: those not yet finished under `features` are written
    by `write(name, members, bar)` (a killed writer's temporaries removed first); returns every chunk's name."""
    from tqdm.auto import tqdm

    from .shards import clean_partial, is_done

    todo = [(name_of(c), c) for c in chunks(hashes)]
    clean_partial(features, [n for n, _ in todo])
    missing = [(n, c) for n, c in todo if not is_done(features, n)]
    if missing:
        with tqdm(total=sum(len(c) for _, c in missing), desc=desc, unit="img", disable=not progress,
                  smoothing=0.1) as bar:
            for name, members in missing:
                write(name, members, bar)
    return [n for n, _ in todo]


def meta_count(features: Path, name: str) -> int:
    return json.loads((features / "shards" / name / "meta.json").read_text())["count"]


def link_split(features: Path, names: list[str], where: Path) -> Path:
    """A directory in precompute's layout whose shards are the cached chunks `names` (symlinks)."""
    shards = where / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    for name in names:
        link, target = shards / name, (features / "shards" / name).resolve()
        if link.is_symlink() and link.resolve() != target:  # ours, pointing at another cache's chunk
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(target, target_is_directory=True)
    return where


def skipped_images(features: Path, names: list[str], images: Images) -> dict[str, str]:
    """path → why, for the images precompute could not decode (recorded in each shard's meta)."""
    from .data import meta_of

    out = {}
    for name in names:
        for h, why in meta_of(features / "shards" / name).get("skipped_keys", {}).items():
            out[str(images.paths.get(h, h))] = why
    return out


# -- quality on features ---------------------------------------------------------------------------

def features_of(dirs: list[Path], pooling: str):
    """(pooled DINOv2 input, teacher image embedding) of every row of these precompute directories."""
    from .data import EmbeddingSet

    data = EmbeddingSet(dirs, pooling)
    x, teacher, _ = data.all()
    return x, torch.nn.functional.normalize(teacher, dim=-1).numpy()


def quality_report(projector, x: torch.Tensor, teacher: np.ndarray, text: np.ndarray, queries, labels=None) -> dict:
    with torch.no_grad():
        ours = torch.nn.functional.normalize(projector.float().eval()(x).float(), dim=-1).numpy()
    return q.compare(ours, teacher, text, queries, labels)


# -- fit -------------------------------------------------------------------------------------------

def resolve_init(source: str, init: str | None, from_scratch: bool) -> tuple[str | None, object | None]:
    """(what the fit starts from, its projector): `init`, else the source's own projector unless
    `from_scratch`; a source whose projector cannot be had starts from scratch, and says so."""
    from dinov2clip.factory import build, resolve_source

    if from_scratch and init:
        raise UserError("give --init SOURCE or --from-scratch, not both")
    if from_scratch:
        return None, None
    start = init or source
    try:
        # the projector alone, checked against its encoders (`build`, not `load`: no demo notice while fitting)
        model = build(*resolve_source(start), device="cpu", dtype="fp32", image=False, text=False)
    except UserError as e:
        if init:
            raise
        print(f"fit: starting from scratch: {source} has no projector to start from ({e})", file=sys.stderr)
        return None, None
    return start, model


def fit(inputs, model: str, out, *, init: str | None = None, from_scratch: bool = False, epochs: int = 10,
        batch_size: int = 256, lr: float = 1e-3, hidden_dim: int = 2048, num_blocks: int = 6,
        val_percent: float = VAL_PERCENT, queries: str | None = None, template: str = q.TEMPLATE,
        labels: str | None = None, cache=None, device: str | None = None, dtype: str = "auto",
        encode_batch_size: int = 32, workers: int = 4, overwrite: bool = False, seed: int = 0,
        progress: bool = True) -> dict:
    """Fit a projector to the images of `inputs` (folders, files, globs); write the model directory `out`."""
    from dinov2clip.factory import resolve_source

    from .precompute import expand_shards

    check_fit(out, overwrite, epochs, batch_size, encode_batch_size, val_percent)
    config, _ = resolve_source(model)  # a bad source fails here, before any image is read
    pooling = config.dinov2["pooling"]
    shard_specs = [i for i in inputs if is_shard(i)]
    shards = expand_shards(shard_specs) if shard_specs else []
    if shards and labels is not None:
        raise UserError("--labels and --label-field take image files; webdataset shards carry no such labels")
    images = hash_images(find_images([i for i in inputs if not is_shard(i)]))  # bad input fails before any weight
    if len(images.paths) < 10 and not shards:
        raise UserError(f"fit needs at least 10 distinct readable images, found {len(images.paths)} in "
                        f"{', '.join(map(str, inputs))}" + (f" ({len(images.unreadable)} unreadable)"
                                                           if images.unreadable else ""))
    start, start_model = resolve_init(model, init, from_scratch)
    if start_model is not None and start_model.encoder_fingerprint != identity.encoders(config):
        raise UserError(f"--init {start} was trained for encoders {identity.label(start_model.config)}, "
                        f"{model} has {identity.label(config)}: its projector does not fit them")
    train_hashes, val_hashes = split(images, val_percent)
    features = feature_dir(model, device, dtype, cache)
    encoding = Encoding(model, device, dtype, encode_batch_size, workers, progress)
    train_names = encode(images, train_hashes, features, encoding)
    val_names = encode(images, val_hashes, features, encoding)
    if shards:
        more = encode_shards(shards, features, encoding, val_percent)
        train_names, val_names = train_names + more[0], val_names + more[1]
    skipped = skipped_images(features, train_names + val_names, images)
    from_shards = sum(meta_count(features, n) for n in train_names + val_names if n.startswith("fit-wds-"))
    if len(images.paths) + from_shards < 10:
        raise UserError(f"fit needs at least 10 readable images, found {len(images.paths) + from_shards} in "
                        f"{', '.join(map(str, inputs))}")

    recipe = {"version": FIT_VERSION, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "hidden_dim": hidden_dim, "num_blocks": num_blocks, "pooling": pooling, "val_percent": val_percent,
              "init": start, "init_projector": start_model and start_model.projector.sha256}
    trained = train_stage(features, train_names, val_names, recipe, start_model, model, device, progress)
    after, before = held_out_quality(trained, model, images, val_hashes, start_model, queries, template, labels)
    counts = {"images_given": images.given, "distinct": len(images.paths), "from_shards": from_shards,
              "shards": len(shards), "unreadable": len(images.unreadable) +
              len(skipped), "train": trained.n_train, "val": after["images"], "encoded_now": encoding.encoded}
    fit_record = {"image_manifest_sha256": images.manifest_sha256, "counts": counts, "recipe": recipe,
                  "init": start, "run": trained.run_key, "quality_held_out": {"after": after, "before": before}}
    return export_and_report(trained, out, fit_record, after, before, queries, labels,
                             {**images.unreadable, **skipped})


@dataclass
class Trained:
    """A finished train stage: its run directory (named by everything it depends on) and summary."""
    run: Path
    run_key: str
    val_dir: Path
    n_train: int
    summary: dict
    pooling: str


def train_stage(features: Path, train_names: list[str], val_names: list[str], recipe: dict, start_model,
                model_source: str, device: str | None, progress: bool) -> Trained:
    """The train stage (MSE only, the best validation epoch selected) over cached shards `features`/`names`, in
    a run directory named by the recipe and the shards, so a killed run resumes from its last epoch.
    `model_source` is what the trained model directory is built from ("" : the shards' recorded config)."""
    from .config import TrainConfig
    from .train import train

    run_key = hashlib.sha256(json.dumps({"recipe": recipe, "train": train_names, "val": val_names,
                                         "features": features.name}, sort_keys=True).encode()).hexdigest()[:24]
    run = features.parent.parent / "runs" / run_key
    train_dir = link_split(features, train_names, run / "data" / "train")
    val_dir = link_split(features, val_names, run / "data" / "val")
    n_train = sum(meta_count(features, n) for n in train_names)
    init_file = None
    if start_model is not None:
        init_file = run / "init.safetensors"
        if not init_file.is_file():
            from dinov2clip.modeldir import write_projector

            run.mkdir(parents=True, exist_ok=True)
            write_projector(start_model.projector, init_file)
    cfg = TrainConfig(train=[str(train_dir)], val=[str(val_dir)], out=str(run / "train"), pooling=recipe["pooling"],
                      hidden_dim=recipe["hidden_dim"], num_blocks=recipe["num_blocks"], epochs=recipe["epochs"],
                      batch_size=max(1, min(recipe["batch_size"], n_train)), lr=recipe["lr"], mse_weight=1.0,
                      contrastive_weight=0.0, seed=recipe["seed"], device=device or "auto", bf16=True,
                      model_source=model_source, recipe="fit", init=str(init_file or ""), progress=progress,
                      resume=(run / "train" / "checkpoints" / "last.pt").is_file())
    summary = train(cfg) if not (run / "train" / "summary.json").is_file() else \
        json.loads((run / "train" / "summary.json").read_text())
    return Trained(run, run_key, val_dir, n_train, summary, recipe["pooling"])


def held_out_quality(trained: Trained, model: str, images: Images, val_hashes: list[str], start_model, queries,
                     template: str, labels) -> tuple[dict, dict | None]:
    """The report on the held-out images: the fitted projector and, where it started from one, its start.
    `model` gives the text tower (CLIP's)."""
    from dinov2clip import load_encoders
    from dinov2clip.projector import load_projector

    fitted = load_projector(Path(trained.summary["model"]))
    x, teacher = features_of([trained.val_dir], trained.pooling)
    vocab, labels_of = queries_for(queries, template, labels, [images.paths[h] for h in val_hashes])
    text_model = load_encoders(model, image=False, text=True, device="cpu", dtype="fp32")
    text = text_model.encode_text(vocab).numpy()
    rows = kept_rows(trained.val_dir)
    lab = labels_of(rows, images) if labels_of else None
    after = quality_report(fitted, x, teacher, text, vocab, lab)
    before = quality_report(start_model.projector, x, teacher, text, vocab, lab) if start_model else None
    return after, before


def export_and_report(trained: Trained, out, fit_record: dict, after: dict, before: dict | None, queries, labels,
                      unreadable: dict, parts: Path | None = None) -> dict:
    """The model directory OUT (the trained one, `fit_record` in its provenance; bundled towers from `parts`,
    else from the trained directory) and the quality report files; what `fit` returns."""
    model_dir = export(Path(trained.summary["model"]), Path(out), fit_record, parts)
    report = {**after, "model": str(model_dir), "unreadable": fit_record["counts"]["unreadable"],
              "queries_from": queries_from(queries, labels), "before": before}
    report["files"] = q.write_report(report, trained.run / "quality")
    return {"model": str(model_dir), "counts": fit_record["counts"], "unreadable": unreadable,
            "selected_epoch": trained.summary["selected_epoch"], "quality": report, "run": str(trained.run)}


def check_fit(out, overwrite: bool, epochs: int, batch_size: int, encode_batch_size: int,
              val_percent: float) -> None:
    """What every fit refuses before it reads an image: counts below 1, a held-out share outside (0, 50), an
    `out` that is a file, or a folder that is not a model directory (or is one, without `overwrite`)."""
    from dinov2clip.modeldir import is_model_dir

    if epochs < 1 or batch_size < 1 or encode_batch_size < 1:
        raise UserError("epochs, batch size and encode batch size must be ≥ 1")
    if not 0 < val_percent < 50:
        raise UserError(f"--val-percent must be between 0 and 50, got {val_percent}")
    path = Path(out)
    if path.is_file():
        raise UserError(f"--out {out} is a file: give a directory for the model")
    if path.is_dir() and any(path.iterdir()):
        if not is_model_dir(path):
            raise UserError(f"--out {out} is a non-empty folder that is not a dinov2clip model directory: "
                            "choose another")
        if not overwrite:
            raise UserError(f"--out {out} already holds a model: pass --overwrite to replace it")


def export(trained: Path, out: Path, record: dict, parts: Path | None = None) -> Path:
    """The trained model directory, with `record` in its provenance, written to `out` (atomically); its bundled
    towers are copied from `parts` (default: the trained directory)."""
    from dinov2clip.config import read_config
    from dinov2clip.modeldir import save_model_dir
    from dinov2clip.projector import load_projector

    config = read_config(trained)
    config.provenance = {**config.provenance, "recipe": "fit (training.run fit)", "fit": record}
    config.weights_sha256 = {}
    config.projector = {k: v for k, v in config.projector.items() if k not in ("tensor_sha256", "path")}
    return save_model_dir(config, load_projector(trained), out, overwrite=True, parts=parts or trained)


def kept_rows(split_dir: Path) -> list[str]:
    """The content hashes of the rows of a split, in EmbeddingSet's row order (shard name, then row)."""
    from .shards import TEXT

    out = []
    for shard in sorted((split_dir / "shards").iterdir()):
        out += json.loads((shard / TEXT).read_text())["keys"]
    return out


def queries_for(queries: str | None, template: str, labels, paths):
    """(query texts, labeller or None). `labels="folder"`: each image's class is its parent folder's name; a
    dict: path → class (None: unlabelled, left out of the labelled figures)."""
    if "{}" not in template:
        raise UserError(f"--template must contain {{}} where the class goes, got {template!r}")
    if labels is None:
        return (q.read_queries(queries) if queries else [template.format(w) for w in q.VOCABULARY]), None
    if labels == "folder":
        label_of = {str(p): Path(p).parent.name for p in paths}
    elif isinstance(labels, dict):
        label_of = {str(p): labels.get(str(p)) for p in paths}
    else:
        raise UserError(f"--labels takes 'folder' (the parent folder's name is the class), got {labels!r}")
    classes = sorted({c for c in label_of.values() if c is not None})
    if len(classes) < 2:
        raise UserError(f"labels name {len(classes)} class(es) among these images: zero-shot needs at least two")

    def labeller(rows, images):
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index.get(label_of.get(str(images.paths[h])), -1) for h in rows])

    return [template.format(c.replace("_", " ")) for c in classes], labeller


def queries_from(queries, labels) -> str:
    return f"file {queries}" if queries else ("label classes (folders)" if labels else "built-in vocabulary")


def quality(inputs, model: str, out, *, queries: str | None = None, template: str = q.TEMPLATE,
            labels: str | None = None, max_images: int = 5000, cache=None, device: str | None = None,
            dtype: str = "auto", encode_batch_size: int = 32, workers: int = 4, seed: int = 0,
            progress: bool = True) -> dict:
    """The quality report of `model` against its CLIP teacher on (a sample of) the images of `inputs`."""
    from dinov2clip import load

    from .report import report_files

    if max_images < 2:
        raise UserError(f"--max-images must be ≥ 2, got {max_images}")
    report_files(out, q.FILES, q.FORMAT)  # a file, or another program's files there: refused before any work
    trained = load(model, image=False, text=True, device="cpu", dtype="fp32")  # a bad model fails before work
    images = hash_images(find_images(inputs))
    hashes = list(images.paths)
    sampled = len(hashes) > max_images
    if sampled:
        hashes = sorted(np.random.default_rng(seed).choice(hashes, max_images, replace=False).tolist())
    vocab, labels_of = queries_for(queries, template, labels, [images.paths[h] for h in hashes])
    features = feature_dir(model, device, dtype, cache)
    encoding = Encoding(model, device, dtype, encode_batch_size, workers, progress)
    # chunked as fit chunks them (its default split), so images a fit encoded are read from the cache
    train, val = split(Images({h: images.paths[h] for h in hashes}), VAL_PERCENT)
    names = encode(images, train, features, encoding) + encode(images, val, features, encoding)
    skipped = skipped_images(features, names, images)
    # chunk names say which images, the features folder which encoders: both name the run
    run = features.parent.parent / "quality" / hashlib.sha256("".join([features.name, *names]).encode()).hexdigest()[:24]
    split_dir = link_split(features, names, run)
    x, teacher = features_of([split_dir], trained.config.dinov2["pooling"])
    rows = kept_rows(split_dir)
    text = trained.encode_text(vocab).numpy()
    report = quality_report(trained.projector, x, teacher, text, vocab, labels_of(rows, images) if labels_of else None)
    report.update({"model": model, "fingerprint": trained.fingerprint, "images_given": images.given,
                   "sampled": {"of": len(images.paths), "taken": len(hashes), "seed": seed} if sampled else None,
                   "unreadable": len(images.unreadable) + len(skipped),
                   "unreadable_files": {**images.unreadable, **skipped}, "queries_from": queries_from(queries, labels),
                   "query_texts": vocab, "encoded_now": encoding.encoded})
    report["files"] = q.write_report(report, out)
    return report

"""`fit --from-field FIELD`: a projector whose input is the DINOv2 embeddings already stored in a FiftyOne field
(issue 20), whatever wrote them.

    python -m training.run fit --dataset NAME --from-field dinov2 --model reference --out my-model
    python -m training.run fit --dataset NAME --from-field emb --producer dinov2-vitb14-torch --model reference ...

The projector's input is exactly the stored vectors; CLIP's image tower (the teacher of `--model`) reads only the
images of the training sample (the samples that have the field, at most --max-train-images of them). The model
directory's DINOv2 section names the field and its producer instead of a DINOv2 to load, so its encoder
fingerprint is its own; indexing projects the field (`fiftyone_dinov2clip.brain`), and samples without it are
first embedded by that producer. Everything after the features (split, train stage, held-out report, export) is
`training.fit`'s own.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from dinov2clip import identity
from dinov2clip.errors import UserError

from . import quality as q
from .fit import (VAL_PERCENT, Images, check_fit, encode_chunks, export_and_report, feature_dir, hash_images,
                  held_out_quality, resolve_init, skipped_images, split, train_stage)

FIELD_VERSION = 1  # bump when the features this module stores change meaning


def field_config(source_config, field: str, producer: dict, width: int):
    """The source's CLIP and preprocessing, with a DINOv2 section that names the field and its producer: the
    origin (hence the encoder fingerprint) is the producer's, never a loadable DINOv2's."""
    ident = producer.get("encoder_fingerprint") or producer["model"]
    return replace(source_config, projector={}, weights_sha256={}, provenance={}, dinov2={
        "source": f"field:{field}", "origin": f"stored-embeddings:{producer['kind']}:{ident}", "pooling": "cls",
        "field": field, "producer": producer, "hidden_size": width})


def check_width(vectors: list[np.ndarray], field: str, producer: dict, want: int | None) -> int:
    widths = sorted({len(v) for v in vectors})
    if len(widths) > 1:
        raise UserError(f"field {field!r} holds vectors of {len(widths)} widths ({', '.join(map(str, widths[:5]))}):"
                        " one producer writes one width; recompute the field")
    if want is not None and widths[0] != want:
        raise UserError(f"field {field!r} holds {widths[0]}-d vectors; {producer['model']} writes {want}-d ones: "
                        "name the model that wrote the field")
    return widths[0]


def start_from(model: str, source_config, producer: dict, width: int, init: str | None, from_scratch: bool):
    """(what the fit starts from, its model): --init (its input must be the field's width); else the source's
    own projector when our compute_embeddings wrote the field with these very encoders; else scratch."""
    from dinov2clip import load

    if from_scratch and init:
        raise UserError("give --init SOURCE or --from-scratch, not both")
    if init and not from_scratch:
        start_model = load(init, image=False, text=False, device="cpu", dtype="fp32")
        got = start_model.projector.config.input_dim
        if got != width:
            raise UserError(f"--init {init} takes {got}-d inputs; the field holds {width}-d vectors")
        return init, start_model
    if not from_scratch and producer.get("encoder_fingerprint") == identity.encoders(source_config):
        return resolve_init(model, None, False)
    return None, None


def usable(paths: list[str], values: list, field: str) -> tuple[dict[str, np.ndarray], dict]:
    """filepath → vector of the samples that have a finite value (a file's first sample), and what was left out."""
    out, left = {}, {"without_field": 0, "non_finite": 0}
    for path, value in zip(paths, values):
        if value is None or not path:
            left["without_field"] += 1
            continue
        vec = np.asarray(value, np.float32).ravel()
        if not np.isfinite(vec).all():
            left["non_finite"] += 1
            continue
        out.setdefault(path, vec)
    return out, left


class Teacher:
    """The CLIP teacher's image tower, loaded only when some chunk is not cached yet; counts what it encoded."""

    def __init__(self, source: str, device, dtype, batch_size: int, workers: int):
        self.source, self.device, self.dtype = source, device, dtype
        self.batch_size, self.workers = batch_size, workers
        self.encoders = None
        self.encoded = 0

    def load(self):
        if self.encoders is None:
            from dinov2clip import load_encoders

            self.encoders = load_encoders(self.source, device=self.device, dtype=self.dtype, image=False,
                                          text=False, teacher=True, batch_size=self.batch_size)
        return self.encoders

    def embed(self, paths: list[Path], bar) -> tuple[list[int], np.ndarray, dict[int, str]]:
        """(indices embedded, their teacher embeddings, index → why for the images that could not be read),
        through the core's per-image batch loop: a bad image fails alone."""
        from dinov2clip.embed import iter_pixel_batches

        enc = self.load()
        kept, embs, failed = [], [], {}
        for idx, pixels, failures in iter_pixel_batches(enc.teacher_transform, paths, self.batch_size, self.workers):
            failed.update(dict(failures))
            if pixels is not None:
                kept += idx
                embs.append(enc.encode_teacher(pixels).numpy())
            bar.update(len(idx) + len(failures))
        self.encoded += len(paths)
        out = np.concatenate(embs) if embs else np.zeros((0, enc.embed_dim), np.float32)
        return kept, out, failed


def chunk_name(config, members: list[str], vectors: dict[str, np.ndarray]) -> str:
    """Named by its content: the producer, the images and the stored vectors (a changed vector is a new chunk)."""
    h = hashlib.sha256(identity.towers(config).encode())
    for m in members:
        h.update(m.encode())
        h.update(vectors[m].tobytes())
    return "field-" + h.hexdigest()[:24]


def write_chunk(features: Path, name: str, members: list[str], images: Images, vectors, config, teacher: Teacher,
                bar) -> None:
    """One precompute-format shard: dinov2_cls = the stored vectors ("cls" pooling reads only those), the
    teacher's image embedding, no patches and no captions."""
    from .shards import encoders_record, write_shard

    kept, clip_image, failed = teacher.embed([images.paths[h] for h in members], bar)
    keys = [members[i] for i in kept]
    width = config.dinov2["hidden_size"]
    cls = np.stack([vectors[k] for k in keys]) if keys else np.zeros((0, width), np.float32)
    enc = teacher.encoders
    arrays = {"dinov2_cls": cls, "dinov2_patch_mean": np.zeros_like(cls), "clip_image": clip_image,
              "clip_text": np.zeros_like(clip_image)}
    # precompute's record of the teacher (preprocessing, dtypes), with the field model's own identity
    encoders = {**encoders_record(enc, ""), "fingerprint": identity.towers(config),
                "config": config.to_dict()}
    meta = {"source": f"field {config.dinov2['field']}", "num_patches": 0, "num_register_tokens": 0,
            "skipped": len(failed), "skipped_keys": {members[i]: why for i, why in failed.items()},
            "encoders": encoders, "captioned": False, "captions_cut": 0}
    write_shard(features, name, arrays, keys, [""] * len(keys), meta)


def encode(images: Images, hashes: list[str], vectors, config, features: Path, teacher: Teacher,
           progress: bool) -> list[str]:
    """Make sure every chunk of `hashes` is a finished shard under `features`; returns the chunks' names."""
    return encode_chunks(hashes, features, lambda members: chunk_name(config, members, vectors),
                         lambda name, members, bar: write_chunk(features, name, members, images, vectors, config,
                                                                teacher, bar),
                         "encode images (CLIP teacher)", progress)


def fit_field(dataset: str, field: str, model: str, out, *, view: str | None = None, producer: str | None = None,
              max_train_images: int | None = None, label_field: str | None = None, init: str | None = None,
              from_scratch: bool = False, epochs: int = 10, batch_size: int = 256, lr: float = 1e-3,
              hidden_dim: int = 2048, num_blocks: int = 6, val_percent: float = VAL_PERCENT,
              queries: str | None = None, template: str = q.TEMPLATE, cache=None, device: str | None = None,
              dtype: str = "auto", encode_batch_size: int = 32, workers: int = 4, overwrite: bool = False,
              seed: int = 0, progress: bool = True) -> dict:
    """Fit a projector from `field` of a dataset (or saved view) to `model`'s CLIP teacher; write `out`."""
    from dinov2clip.factory import resolve_source
    from fiftyone_dinov2clip.fitting import field_vectors, labels_of, producer_of, producer_width, samples_of

    if max_train_images is not None and max_train_images < 10:
        raise UserError(f"--max-train-images must be ≥ 10, got {max_train_images}")
    # every refusal below comes before any image is read
    check_fit(out, overwrite, epochs, batch_size, encode_batch_size, val_percent)
    source_config, source_root = resolve_source(model)
    samples = samples_of(dataset, view)
    found = producer_of(samples, field, producer)
    _, paths, values = field_vectors(samples, field)
    by_path, left = usable(paths, values, field)
    if not by_path:
        raise UserError(f"no sample of {dataset!r} has a value in field {field!r}")
    width = check_width(list(by_path.values()), field, found, producer_width(found))
    start, start_model = start_from(model, source_config, found, width, init, from_scratch)
    labels = labels_of(samples, label_field) if label_field else None
    chosen = sorted(by_path)
    if max_train_images and len(chosen) > max_train_images:
        chosen = sorted(np.random.default_rng(seed).choice(chosen, max_train_images, replace=False).tolist())

    images = hash_images([Path(p) for p in chosen])  # reads the training sample's files, no other
    if len(images.paths) < 10:
        unreadable = f" ({len(images.unreadable)} unreadable)" if images.unreadable else ""
        raise UserError(f"fit needs at least 10 distinct readable images with field {field!r}, found "
                        f"{len(images.paths)}{unreadable}")
    vectors = {h: by_path[str(p)] for h, p in images.paths.items()}
    config = field_config(source_config, field, found, width)
    train_hashes, val_hashes = split(images, val_percent)
    plain = feature_dir(model, device, dtype, cache)
    features = plain.with_name(f"field-{plain.name}-f{FIELD_VERSION}")
    teacher = Teacher(model, device, dtype, encode_batch_size, workers)
    train_names = encode(images, train_hashes, vectors, config, features, teacher, progress)
    val_names = encode(images, val_hashes, vectors, config, features, teacher, progress)
    skipped = skipped_images(features, train_names + val_names, images)

    recipe = {"version": FIELD_VERSION, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "hidden_dim": hidden_dim, "num_blocks": num_blocks, "pooling": "cls", "val_percent": val_percent,
              "init": start, "init_projector": start_model and start_model.projector.sha256,
              "from_field": {"field": field, "producer": found, "width": width}}
    # "" : the trained directory is built from the shards' recorded config (the field's, not a DINOv2's)
    trained = train_stage(features, train_names, val_names, recipe, start_model, "", device, progress)
    after, before = held_out_quality(trained, model, images, val_hashes, start_model, queries, template, labels)
    counts = {"samples": len(paths), "without_field": left["without_field"], "non_finite": left["non_finite"],
              "images_given": images.given, "distinct": len(images.paths),
              "unreadable": len(images.unreadable) + len(skipped), "train": trained.n_train, "val": after["images"],
              "encoded_now": teacher.encoded}
    record = {"image_manifest_sha256": images.manifest_sha256, "counts": counts, "recipe": recipe, "init": start,
              "run": trained.run_key, "dataset": dataset, "view": view, "teacher": model,
              "quality_held_out": {"after": after, "before": before}}
    return export_and_report(trained, out, record, after, before, queries, labels,
                             {**images.unreadable, **skipped}, parts=source_root)

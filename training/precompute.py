"""The precompute stage (DESIGN §5): webdataset shards → per-shard float16 memmappable arrays.

    torchrun --nproc_per_node 8 -m training.run precompute --model MODEL --shards 'cc12m/{00000..01242}.tar' \\
        --out precomputed/train

Per input shard, one directory `OUT/shards/NAME/` holding
  dinov2_cls.npy, dinov2_patch_mean.npy  [N, H] float16: every pooling is trainable from one pass
      (mean = (cls + P·patch_mean)/(1 + P), P = meta.json's num_patches; cls; cls+mean)
  clip_image.npy  [N, D] float16: the teacher's L2-normalised image embedding (its own preprocessing)
  clip_text.npy   [N, D] float16: the teacher's L2-normalised caption embedding
  text.json       keys and captions, row-aligned
  meta.json       counts, skipped (corrupt) samples, dims, model identity, array hashes — written last
The directory is written under a temporary name and renamed when complete, so a killed run leaves
either a whole shard or none; a rerun skips finished shards. Reader → mapper → writer per shard (the
decode threads work one chunk ahead of the model, so the two overlap); the distributor (`rank_slice`)
hands each `torchrun` rank every WORLD_SIZE-th shard.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from dinov2clip.errors import UserError
from dinov2clip.formats import IMAGE_EXTENSIONS

from .shards import META, clean_partial, encoders_record, fingerprints, is_done, write_shard

IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # webdataset member extensions


# -- distributor ---------------------------------------------------------------------------------

def expand_shards(specs: Sequence[str]) -> list[str]:
    """Brace patterns (`a/{00000..00009}.tar`), local globs and fsspec URLs → a sorted, unique list."""
    import glob

    from braceexpand import braceexpand

    out = []
    for spec in specs:
        for item in braceexpand(str(spec)):
            if "://" not in item and any(c in item for c in "*?["):
                found = sorted(glob.glob(item))
                if not found:
                    raise UserError(f"no shard matches {item!r}")
                out += found
            else:
                out.append(item)
    if not out:
        raise UserError("no input shards given")
    return sorted(set(out))


def rank_slice(items: Sequence, rank: int | None = None, world: int | None = None) -> list:
    """This process's share: every `world`-th item from `rank` (RANK/WORLD_SIZE of torchrun by default)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    return list(items[rank::world])


def shard_name(url: str) -> str:
    name = url.rstrip("/").split("/")[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


class UnreadableShard(UserError):
    """A shard that cannot be read to its end: skipped whole (never half-written) unless strict."""


# -- reader --------------------------------------------------------------------------------------

def read_samples(url: str) -> Iterator[dict]:
    """Stream a webdataset tar through fsspec: one dict per key, {'__key__', 'jpg', 'txt', 'json'...}
    (webdataset's grouping: the key is the member path up to the first dot of its base name)."""
    import fsspec

    with fsspec.open(url, "rb", compression="infer") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        current: dict | None = None
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            prefix = member.name[: len(member.name) - len(base)]
            key, ext = prefix + base.split(".", 1)[0], base.split(".", 1)[1].lower()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            current = current or {"__key__": key}
            current[ext] = tar.extractfile(member).read()
        if current is not None:
            yield current


# Captions are cut to this many characters (CLIP reads 77 tokens; img2dataset can deliver 64,000-character
# alt texts) and counted per shard (meta.json's captions_cut); the cut caption ends with CUT_MARK.
MAX_CAPTION_CHARS = 1000
CUT_MARK = "…"


def bound_caption(caption: str) -> str:
    return caption if len(caption) <= MAX_CAPTION_CHARS else caption[:MAX_CAPTION_CHARS - 1] + CUT_MARK


def caption_of(sample: dict) -> str | None:
    """The sample's caption, or None (no caption, an empty one, or a json caption that is not a string:
    such samples are skipped and counted, never trained on)."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8", errors="replace").strip() or None
    if "json" in sample:
        try:
            caption = json.loads(sample["json"]).get("caption")
        except (ValueError, AttributeError):
            return None
        return caption.strip() or None if isinstance(caption, str) else None
    return None


# -- mapper --------------------------------------------------------------------------------------

def encode_images(enc, dino_pixels: torch.Tensor, clip_pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One batch through the encoders: DINOv2's CLS and patch mean (every pooling can be rebuilt from them)
    and the teacher's image embedding."""
    with torch.inference_mode(), enc.autocast():
        cls, patches = enc.image_encoder.tokens(dino_pixels.to(enc.device))
        cls, patch_mean = cls.float(), patches.float().mean(dim=1)
    return {"dinov2_cls": cls.cpu(), "dinov2_patch_mean": patch_mean.cpu(),
            "clip_image": enc.encode_teacher(clip_pixels), "num_patches": patches.shape[1]}


def load_encoders(source: str, device: str | None = None, dtype="auto", batch_size: int = 64):
    """The source's encoders with the CLIP teacher's image tower, and no projector (none need exist)."""
    from dinov2clip import load_encoders as load

    return load(source, device=device, dtype=dtype, batch_size=batch_size, teacher=True)


# -- one shard, then the stage -------------------------------------------------------------------

def precompute_shard(enc, url: str, out_dir, batch_size: int = 64, workers: int = 4, bar=None,
                     source: str | None = None, samples: Iterable[dict] | None = None, name: str | None = None,
                     captioned: bool = True) -> dict:
    """Reader → mapper → writer for one shard (`enc`: `dinov2clip.Encoders` with the teacher); returns its meta.

    `samples` (dicts in `read_samples`' layout) replaces reading `url`, and `name` names the shard: `fit`
    gives image files this way. `captioned=False`: images alone (`fit`'s MSE needs no caption); clip_text is
    then zeros and the meta says so."""
    from dinov2clip.embed import iter_pixel_batches

    found, kept, skipped = [], [], {}  # (key, caption) of each sample with an image; rows kept; key → why not
    parts, num_patches = {k: [] for k in ("dinov2_cls", "dinov2_patch_mean", "clip_image")}, 0

    def images(samples):
        for sample in samples:
            key, caption = sample["__key__"], caption_of(sample)
            data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            if data is None or (caption is None and captioned):
                skipped[key] = "no image" if data is None else "no caption"
                if bar is not None:
                    bar.update(1)
                continue
            found.append((key, bound_caption(caption or "")))
            yield data

    transforms = {"dinov2": enc.preprocess, "teacher": enc.teacher_transform}
    try:  # the core's image loop: decoded once for both towers, a chunk ahead of the model
        stream = images(read_samples(url) if samples is None else samples)
        for idx, pixels, failures in iter_pixel_batches(transforms, stream, batch_size, max(1, workers)):
            skipped.update((found[i][0], why) for i, why in failures)
            if pixels is not None:
                out = encode_images(enc, pixels["dinov2"], pixels["teacher"])
                num_patches = out.pop("num_patches")
                for k, v in out.items():
                    parts[k].append(v.numpy())
                kept += idx
            if bar is not None:
                bar.update(len(idx) + len(failures))
    except (OSError, tarfile.TarError, EOFError) as e:
        raise UnreadableShard(f"unreadable shard {url}: {type(e).__name__}: {e}") from None
    keys, captions = [found[i][0] for i in kept], [found[i][1] for i in kept]
    dim_d = enc.image_encoder.hidden_size
    arrays = {k: (np.concatenate(v) if v else np.zeros((0, dim_d if "dinov2" in k else enc.embed_dim), np.float32))
              for k, v in parts.items()}
    arrays["clip_text"] = (enc.encode_text(captions).numpy() if captions and captioned
                           else np.zeros((len(captions), enc.embed_dim), np.float32))
    meta = {"source": url, "num_patches": int(num_patches), "num_register_tokens": enc.image_encoder.num_register_tokens,
            "skipped": len(skipped), "skipped_keys": skipped, "encoders": encoders_record(enc, source or ""),
            "captioned": captioned, "captions_cut": sum(c.endswith(CUT_MARK) for c in captions)}
    write_shard(out_dir, name or shard_name(url), arrays, keys, captions, meta)
    return meta


def precompute(model: str, shards: Sequence[str], out_dir, batch_size: int = 64, device: str | None = None,
               dtype: str = "auto", workers: int = 4, rank: int | None = None, world: int | None = None,
               overwrite: bool = False, progress: bool = True, strict: bool = False) -> dict:
    """Precompute this rank's share of `shards` into `out_dir`; finished shards are skipped (resume).

    An unreadable shard (truncated or corrupt tar, a URL that fails) is skipped whole, named on stderr and
    in the summary's `unreadable`, and retried by the next run; `strict=True` stops at it instead."""
    from tqdm.auto import tqdm

    from dinov2clip.factory import towers_of

    urls = expand_shards(shards)
    names = [shard_name(u) for u in urls]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise UserError(f"two shards share the name {sorted(dupes)[0]!r}: outputs would collide")
    mine = rank_slice(urls, rank, world)
    ours = towers_of(model)
    stale = {fp: n for fp, n in fingerprints(out_dir).items() if fp != ours}
    if stale and not overwrite:
        fp, theirs = next(iter(stale.items()))
        raise UserError(f"{out_dir} holds shards of other encoders ({fp[:12]}: {', '.join(theirs[:3])}"
                        f"{', ...' if len(theirs) > 3 else ''}); {model} is {ours[:12]}: choose another --out, or "
                        "pass --overwrite to recompute them with this model")
    if stale and (rank if rank is not None else int(os.environ.get("RANK", 0))) == 0:
        for gone in sorted({n for theirs in stale.values() for n in theirs} - set(names)):  # not recomputed below
            shutil.rmtree(Path(out_dir) / "shards" / gone)  # our own shard (it has our meta.json)
    clean_partial(out_dir, [shard_name(u) for u in mine])
    todo = [u for u in mine if overwrite or not is_done(out_dir, shard_name(u))]
    summary = {"shards": len(mine), "done_before": len(mine) - len(todo), "written": 0, "samples": 0, "skipped": 0,
               "unreadable": {}}
    if not todo:
        return summary
    if device is None and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per torchrun rank
    enc = load_encoders(model, device=device, dtype=dtype, batch_size=batch_size)
    start = time.perf_counter()
    with tqdm(desc=f"precompute {len(todo)} shards", unit="img", disable=not progress, smoothing=0.1) as bar:
        for url in todo:
            try:
                meta = precompute_shard(enc, url, out_dir, batch_size, workers, bar, source=str(model))
            except UnreadableShard as e:
                if strict:
                    raise UserError(f"{e} (without --strict it would be skipped)") from None
                summary["unreadable"][url] = str(e)
                print(f"precompute: skipped {e}; a rerun retries it", file=sys.stderr, flush=True)
                continue
            summary["written"] += 1
            summary["samples"] += json.loads((Path(out_dir) / "shards" / shard_name(url) / META).read_text())["count"]
            summary["skipped"] += meta["skipped"]
            rate = (summary["samples"] + summary["skipped"]) / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(samples_per_s=f"{rate:.0f}", skipped=summary["skipped"])
    summary["seconds"] = time.perf_counter() - start
    return summary

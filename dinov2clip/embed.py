"""Embedding files on disk with per-image failure handling, and the embeddings file format."""
from __future__ import annotations

import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch

from .atomic import atomic_path
from .errors import ImageError, UserError
from .formats import images_under
from .preprocess import BACKGROUND, load_rgb

FILE_FORMAT = "dinov2clip-embeddings/1"


def expand_images(inputs: Iterable[str]) -> list[Path]:
    """Files as given; folders searched recursively for image extensions; sorted per folder."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out += images_under(path)
        elif path.is_file():
            out.append(path)
        else:
            raise UserError(f"no such file or directory: {item}")
    return out


def iter_pixel_batches(transforms: Callable | Mapping[str, Callable], items: Iterable, batch_size: int,
                       workers: int = 0, background: tuple = BACKGROUND) -> Iterator[tuple]:
    """The one image loop: each item (path, bytes, PIL image) decoded once (`load_rgb`: EXIF orientation, RGB
    over `background`) and given to `transforms` (one callable, or several by name: e.g. DINOv2's and the
    teacher's), in batches. Yields (indices, pixels, failures) per batch: pixels stacked (a dict of them for
    several transforms; None when the whole batch failed), failures a list of (index, message): a bad image
    fails alone, never its batch. `items` is read as batches are needed (a stream works); on `workers`
    threads (PIL releases the GIL) the next batch decodes while the caller works on this one."""
    several = isinstance(transforms, Mapping)
    named = transforms if several else {None: transforms}

    def one(item):
        try:
            image = load_rgb(item, background)
            return {name: transform(image) for name, transform in named.items()}, None
        except ImageError as e:
            return None, str(e)

    def batch(start, results):
        ok = [(start + k, px) for k, (px, err) in enumerate(results) if err is None]
        failures = [(start + k, err) for k, (_, err) in enumerate(results) if err is not None]
        pixels = {name: torch.stack([px[name] for _, px in ok]) for name in named} if ok else None
        return [i for i, _ in ok], pixels if several or pixels is None else pixels[None], failures

    items, start, ahead = iter(items), 0, None  # ahead: (start, results or futures) of the next batch
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    try:
        while True:
            chunk = list(itertools.islice(items, batch_size))
            submitted = (start, [pool.submit(one, x) for x in chunk] if pool else [one(x) for x in chunk])
            start += len(chunk)
            if ahead is not None:
                yield batch(ahead[0], [f.result() for f in ahead[1]] if pool else ahead[1])
            if not chunk:
                return
            ahead = submitted
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def embed_files(model, paths: list[Path], batch_size: int | None = None, workers: int | None = None,
                progress: bool = True):
    """→ (embeddings float32 [M, D], kept paths, failures [(path, message)])."""
    from tqdm.auto import tqdm

    batch_size = batch_size or model.batch_size
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    embs, kept, failures = [], [], []
    with tqdm(total=len(paths), desc="embed", unit="img", disable=not progress) as bar:
        for idx, pixels, failed in iter_pixel_batches(model.preprocess, paths, batch_size, workers,
                                                      model.preprocess.config.background):
            if pixels is not None:
                embs.append(model.encode_image(pixels, batch_size=batch_size))
                kept += [paths[i] for i in idx]
            failures += [(paths[i], msg) for i, msg in failed]
            bar.update(len(idx) + len(failed))
            bar.set_postfix(skipped=len(failures))
    emb = torch.cat(embs).numpy() if embs else np.zeros((0, model.embed_dim), np.float32)
    return emb, kept, failures


def save_embeddings(path: Path, embeddings: np.ndarray, items: list[str], meta: dict) -> None:
    """npz (no pickles) written to a temporary name, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FILE_FORMAT, **meta}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz"
        np.savez(f, embeddings=embeddings.astype(np.float32), items=np.array(items, dtype=str),
                 meta=np.array(json.dumps(meta)))


def load_embeddings(path: Path) -> tuple[np.ndarray, list[str], dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"embeddings file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            emb, items, meta = f["embeddings"], f["items"].tolist(), json.loads(str(f["meta"]))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path} is not a dinov2clip embeddings file ({type(e).__name__})") from None
    if meta.get("format") != FILE_FORMAT:
        raise UserError(f"{path}: unsupported embeddings format {meta.get('format')!r}")
    return emb, items, meta

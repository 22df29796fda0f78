"""Image-text retrieval recall@k with CLIP_benchmark's definitions (DESIGN §6), as fractions.

- text→image, `image_retrieval_recall@k`: the share of captions whose own image is among the k
  best-scoring images.
- image→text, `text_retrieval_recall@k`: the share of images with at least one of their captions
  among the k best-scoring captions. Images without captions are candidates (distractors) for
  text→image and are left out of this average.

Scores are dot products: cosine similarity for the L2-normalised embeddings dinov2clip returns.

Ties count against the model (pessimistic): a positive is ranked behind every negative scoring at
least as high. CLIP_benchmark ranks with `torch.topk`, which breaks exact ties by position; on
continuous scores, where exact ties do not occur, the two agree exactly. Ties matter when
embeddings coincide: duplicate images or captions never help a model, and a collapsed projector
(every image embedded alike) scores 0 text→image, not chance. Equal embeddings give equal scores
as long as the BLAS rounds alike in every block, which the block shapes below keep true for MKL
(tested with duplicated continuous embeddings).

Images without captions are candidates only; CLIP_benchmark would count them as image→text misses
(0 positives / 0 compares false). Karpathy files have none.

How: rank counting instead of top-k. A caption's rank is the number of negative images scoring ≥
its positive; an image's rank is the number of negative captions scoring ≥ its best caption.
Captions are grouped by image, so every positive pair of a block of images lies in one diagonal
block of the score matrix. Those blocks are computed first and fix every threshold; the
off-diagonal blocks follow. Each score is computed exactly once (one GEMM in all) and memory is
bounded by the block size, whatever the number of images.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

DEFAULT_KS = (1, 5, 10)
# CLIP_benchmark key prefix → direction, as written in tables.
DIRECTIONS = {"image_retrieval": "text→image", "text_retrieval": "image→text"}
BLOCK_ELEMENTS = 1 << 22  # scores per block (16 MB in fp32); two such buffers are all the big memory used
MIN_BLOCK_ROWS = 256  # keeps each GEMM efficient when there are very many images


def retrieval_recall(image_emb, text_emb, text_image_ids, ks: Sequence[int] = DEFAULT_KS,
                     block_elements: int = BLOCK_ELEMENTS) -> dict[str, float]:
    """Recall@k in both directions, as fractions keyed `image_retrieval_recall@k` (text→image)
    and `text_retrieval_recall@k` (image→text).

    image_emb [N_img, D] and text_emb [N_txt, D] (torch or numpy); `text_image_ids[i]` is the
    index of caption i's image. Ties count against the model (see the module docstring)."""
    ks = check_ks(ks)
    text_rank, image_rank = retrieval_ranks(image_emb, text_emb, text_image_ids, block_elements)
    return recall_from_ranks(text_rank, image_rank, ks)


def recall_from_ranks(text_rank: torch.Tensor, image_rank: torch.Tensor,
                      ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Ranks from `retrieval_ranks` → recall fractions; images ranked -1 (no captions) are left out."""
    ks = check_ks(ks)
    image_rank = image_rank[image_rank >= 0]
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = int((text_rank < k).sum()) / len(text_rank)
        out[f"text_retrieval_recall@{k}"] = int((image_rank < k).sum()) / len(image_rank)
    return out


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    return tuple(int(k) for k in ks)


@torch.inference_mode()
def retrieval_ranks(image_emb, text_emb, text_image_ids,
                    block_elements: int = BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Pessimistic 0-based ranks: (text→image rank per caption [N_txt], image→text rank per image
    [N_img], -1 for images without captions). Recall@k is the share of ranks below k."""
    images, texts, ids = _check_inputs(image_emb, text_emb, text_image_ids)
    n_img, n_txt = len(images), len(texts)
    order = torch.argsort(ids, stable=True)  # captions grouped by image
    starts = torch.zeros(n_img + 1, dtype=torch.long)
    starts[1:] = torch.cumsum(torch.bincount(ids, minlength=n_img), 0)
    rows_per_block = max(MIN_BLOCK_ROWS, block_elements // n_img)
    width = max(1, block_elements // rows_per_block)
    blocks = _image_blocks(starts, rows_per_block, width)
    max_rows = max(int(starts[e] - starts[a]) for a, e in blocks)  # a block may overshoot by one image

    buffers = _Buffers(max_rows * width, images.dtype)
    text_rank = torch.zeros(n_txt, dtype=torch.long)  # in grouped order until the end
    image_rank = torch.zeros(n_img, dtype=torch.long)
    positive = torch.empty(n_txt, dtype=images.dtype)
    best = torch.full((n_img,), float("inf"), dtype=images.dtype)  # +inf: nothing ranks above it

    # Diagonal blocks: every positive pair, hence every threshold.
    for a, e in blocks:
        r0, r1 = int(starts[a]), int(starts[e])
        if r0 == r1:
            continue
        scores = buffers.mm(texts[order[r0:r1]], images[a:e])
        rows, local = torch.arange(r1 - r0), ids[order[r0:r1]] - a
        pos = scores[rows, local]
        positive[r0:r1] = pos
        best[a:e].scatter_reduce_(0, local, pos, reduce="amax", include_self=False)
        scores[rows, local] = float("-inf")  # a positive is never its own competitor
        text_rank[r0:r1] += buffers.count_ge(scores, pos[:, None], dim=1)
        image_rank[a:e] += buffers.count_ge(scores, best[None, a:e], dim=0)

    # Off-diagonal blocks: negatives only.
    for a, e in blocks:
        r0, r1 = int(starts[a]), int(starts[e])
        if r0 == r1:
            continue
        block_texts, thresholds = texts[order[r0:r1]], positive[r0:r1, None]
        for c0, c1 in _pieces(0, a, width) + _pieces(e, n_img, width):
            scores = buffers.mm(block_texts, images[c0:c1])
            text_rank[r0:r1] += buffers.count_ge(scores, thresholds, dim=1)
            image_rank[c0:c1] += buffers.count_ge(scores, best[None, c0:c1], dim=0)

    out = torch.empty_like(text_rank)
    out[order] = text_rank
    image_rank[starts[1:] == starts[:-1]] = -1
    return out, image_rank


class _Buffers:
    """Two preallocated score buffers, reused by every block so memory stays flat."""

    def __init__(self, elements: int, dtype: torch.dtype):
        self.scores = torch.empty(elements, dtype=dtype)
        self.mask = torch.empty(elements, dtype=dtype)

    @staticmethod
    def _view(buf: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        return buf[:shape[0] * shape[1]].view(shape)

    def mm(self, texts: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        out = self._view(self.scores, (len(texts), len(images)))
        return torch.mm(texts, images.T, out=out)

    def count_ge(self, scores: torch.Tensor, thresholds: torch.Tensor, dim: int) -> torch.Tensor:
        # A float 0/1 mask and a float sum: several times faster than reducing a bool tensor, and
        # exact while fewer than 2**24 values are summed (fp64 beyond).
        mask = self._view(self.mask, tuple(scores.shape))
        torch.ge(scores, thresholds, out=mask)
        return mask.sum(dim, dtype=torch.float64 if scores.shape[dim] >= 1 << 24 else None).long()


def _image_blocks(starts: torch.Tensor, rows: int, width: int) -> list[tuple[int, int]]:
    """Consecutive image ranges holding about `rows` captions and at most `width` images. A short
    last block joins the one before: BLAS kernels for a few rows may round differently, and equal
    embeddings must give equal scores in every block for ties to be seen."""
    n_img, n_txt = len(starts) - 1, int(starts[-1])
    cuts = torch.cat([torch.searchsorted(starts[:-1].contiguous(), torch.arange(0, n_txt, rows)),
                      torch.arange(0, n_img, width), torch.tensor([0, n_img])])
    cuts = torch.unique(cuts).tolist()
    if len(cuts) > 2 and starts[-1] - starts[cuts[-2]] < rows // 2 and cuts[-1] - cuts[-3] <= width:
        del cuts[-2]
    return list(zip(cuts[:-1], cuts[1:]))


def _pieces(lo: int, hi: int, width: int) -> list[tuple[int, int]]:
    return [(s, min(s + width, hi)) for s in range(lo, hi, width)]


def _check_inputs(image_emb, text_emb, text_image_ids):
    images, texts = _matrix(image_emb, "image_emb"), _matrix(text_emb, "text_emb")
    if images.shape[1] != texts.shape[1]:
        raise ValueError(f"image_emb is {images.shape[1]}-d but text_emb is {texts.shape[1]}-d")
    if len(images) == 0 or len(texts) == 0:
        raise ValueError(f"need at least one image and one caption, got {len(images)} and {len(texts)}")
    dtype = torch.float64 if torch.float64 in (images.dtype, texts.dtype) else torch.float32
    images, texts = images.to(dtype).contiguous(), texts.to(dtype).contiguous()
    for name, t in (("image_emb", images), ("text_emb", texts)):
        if not torch.isfinite(t.sum(dim=1)).all():  # a NaN or inf poisons its row's sum; no big temporary
            raise ValueError(f"{name} holds NaN or infinite values")
    ids = torch.as_tensor(np.asarray(text_image_ids))
    if ids.ndim != 1 or len(ids) != len(texts):
        raise ValueError(f"text_image_ids must hold one image index per caption ({len(texts)}), "
                         f"got shape {tuple(ids.shape)}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"text_image_ids must be integers, got {ids.dtype}")
    ids = ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= len(images):
        raise ValueError(f"text_image_ids must lie in [0, {len(images)}), got [{int(ids.min())}, {int(ids.max())}]")
    return images, texts, ids


def _matrix(x, name: str) -> torch.Tensor:
    t = torch.from_numpy(np.require(x, requirements="W")) if isinstance(x, np.ndarray) else \
        torch.as_tensor(x).detach().cpu()
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(t.shape)}")
    if t.dtype != torch.float64:
        t = t.float()  # fp16/bf16 are upcast: scores are compared in fp32 or fp64
    return t

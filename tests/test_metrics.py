"""training.metrics: recalls known by construction (ties, uneven caption counts), a brute-force
reference on tie-heavy integer embeddings across block sizes, and parity with CLIP_benchmark."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import training.metrics as metrics
from training.metrics import recall_from_ranks, retrieval_ranks, retrieval_recall

I3 = torch.eye(3)


def _keys(ks, t2i, i2t):
    out = {}
    for k, a, b in zip(ks, t2i, i2t):
        out[f"image_retrieval_recall@{k}"] = a
        out[f"text_retrieval_recall@{k}"] = b
    return out


# (images, captions, caption→image, ks, expected text→image recalls, expected image→text recalls)
CASES = {
    "perfect": (I3, I3, [0, 1, 2], (1, 2), (1, 1), (1, 1)),
    # Images 0 and 1 are identical: each of their captions ties with the other image (pessimistic: a
    # miss at K=1, a hit at K=2); each image ties with the other's caption.
    "duplicate images": (torch.stack([I3[0], I3[0], I3[1]]), torch.stack([I3[0], I3[0], I3[1]]), [0, 1, 2],
                         (1, 2), (1 / 3, 1), (1 / 3, 1)),
    # Image 0 has three captions, image 1 one, image 2 none (a distractor, left out of image→text).
    # Captions of image 0 point at images 0, 2 and 1; the ones pointing elsewhere also tie image 0
    # with the third image at score 0, so they rank third.
    "uneven caption counts": (I3, torch.stack([I3[0], I3[2], I3[1], I3[1]]), [0, 0, 0, 1], (1, 2, 3),
                              (2 / 4, 2 / 4, 1), (1 / 2, 1, 1)),
    # A collapsed model embeds every image alike: for a caption all images tie, so text→image is 0
    # below K=20 (chance under top-k's position order); every image ranks the captions alike, so
    # image→text is K/20.
    "collapsed": (torch.ones(20, 4), F.normalize(torch.arange(80.).view(20, 4), dim=-1), list(range(20)),
                  (1, 5, 10, 20), (0, 0, 0, 1), (1 / 20, 5 / 20, 10 / 20, 1)),
    # Orthogonal captions score 0 with every image: all tie, the positive ranks last.
    "all zero scores": (I3[:2], torch.stack([I3[2], I3[2]]), [0, 1], (1, 2), (0, 1), (0, 1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_recalls_known_by_construction(name):
    images, texts, ids, ks, t2i, i2t = CASES[name]
    assert retrieval_recall(images, texts, ids, ks=ks) == _keys(ks, t2i, i2t)


def test_ranks_mark_images_without_captions():
    images, texts, ids, *_ = CASES["uneven caption counts"]
    text_rank, image_rank = retrieval_ranks(images, texts, ids)
    assert text_rank.tolist() == [0, 2, 2, 0]
    assert image_rank.tolist() == [0, 1, -1]
    assert recall_from_ranks(text_rank, image_rank, (1,)) == _keys((1,), (0.5,), (0.5,))


def brute_force(images, texts, ids):
    """Pessimistic ranks straight from the definition, one pair at a time."""
    scores = (texts.double() @ images.double().T).tolist()
    text_rank = [sum(j != ids[c] and scores[c][j] >= scores[c][ids[c]] for j in range(len(images)))
                 for c in range(len(texts))]
    image_rank = []
    for j in range(len(images)):
        mine = [c for c in range(len(texts)) if ids[c] == j]
        if not mine:
            image_rank.append(-1)
            continue
        best = max(scores[c][j] for c in mine)
        image_rank.append(sum(ids[c] != j and scores[c][j] >= best for c in range(len(texts))))
    return text_rank, image_rank


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_with_many_ties_and_any_block_size(seed, monkeypatch):
    """Small-integer embeddings give exact scores and ties everywhere; caption counts 0-4 per image in
    shuffled order; tiny blocks force every diagonal/off-diagonal path."""
    rng = np.random.default_rng(seed)
    n_img = int(rng.integers(1, 30))
    counts = rng.integers(0, 5, n_img)
    counts[rng.integers(n_img)] += 1
    ids = rng.permutation(np.repeat(np.arange(n_img), counts))
    images = torch.tensor(rng.integers(-1, 2, (n_img, 3)), dtype=torch.float32)
    texts = torch.tensor(rng.integers(-1, 2, (len(ids), 3)), dtype=torch.float32)
    expected = brute_force(images, texts, ids)
    monkeypatch.setattr(metrics, "MIN_BLOCK_ROWS", 1)
    for block_elements in (1, 5, 37, 1 << 22):
        text_rank, image_rank = retrieval_ranks(images, texts, ids, block_elements=block_elements)
        assert (text_rank.tolist(), image_rank.tolist()) == expected, block_elements


@pytest.mark.parametrize("min_rows", [256, 64])
def test_duplicate_continuous_embeddings_tie_across_blocks(min_rows, monkeypatch):
    """Real data holds duplicate images and captions: their exactly equal scores, computed in different
    blocks, must tie (pessimistically), however the blocks fall."""
    monkeypatch.setattr(metrics, "MIN_BLOCK_ROWS", min_rows)
    g = torch.Generator().manual_seed(0)
    n = 600
    images = F.normalize(torch.randn(n, 64, generator=g), dim=-1)
    twins = torch.randperm(n, generator=g)[:50].view(2, 25)
    images[twins[1]] = images[twins[0]]
    ids = torch.arange(n).repeat_interleave(2)
    texts = F.normalize(images[ids] + 0.3 * torch.randn(len(ids), 64, generator=g), dim=-1)
    texts[2 * twins[1] + 1] = texts[2 * twins[0]]  # image b's second caption is image a's first
    text_rank, image_rank = retrieval_ranks(images, texts, ids, block_elements=min_rows * 200)
    scores = texts @ images.T
    for a, b in twins.T.tolist():
        assert all(text_rank[c] >= 1 for c in (2 * a, 2 * a + 1, 2 * b, 2 * b + 1))  # the twin image ties
        if scores[2 * a, a] >= scores[2 * a + 1, a]:  # a's best caption is duplicated as one of b's
            assert image_rank[a] >= 1


def clip_benchmark_recalls(images, texts, ids, ks, batch_size=64):
    """CLIP_benchmark's own code path after embedding (zeroshot_retrieval.evaluate's second half)."""
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), torch.as_tensor(ids)] = True
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (zr.batchify(zr.recall_at_k, scores, positive, batch_size, "cpu", k=k)
                                              > 0).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (zr.batchify(zr.recall_at_k, scores.T, positive.T, batch_size, "cpu",
                                                         k=k) > 0).float().mean().item()
    return out


def assert_same_counts(ours, theirs, n_txt, n_img):
    """CLIP_benchmark returns float32 means: compare the hit counts they stand for, exactly."""
    assert ours.keys() == theirs.keys()
    for key in ours:
        n = n_txt if key.startswith("image_retrieval") else n_img
        assert round(ours[key] * n) == round(theirs[key] * n), key
        assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key


@pytest.mark.parametrize("seed", range(3))
def test_parity_with_clip_benchmark_on_continuous_embeddings(seed):
    g = torch.Generator().manual_seed(seed)
    n_img, dim = 300, 16
    ids = torch.arange(n_img).repeat_interleave(torch.randint(1, 8, (n_img,), generator=g))
    ids = ids[torch.randperm(len(ids), generator=g)]
    images = F.normalize(torch.randn(n_img, dim, generator=g), dim=-1)
    texts = F.normalize(images[ids] + 0.8 * torch.randn(len(ids), dim, generator=g), dim=-1)
    ks = (1, 5, 10)
    ours = retrieval_recall(images, texts, ids, ks=ks, block_elements=10_000)  # many blocks
    theirs = clip_benchmark_recalls(images, texts, ids, ks)
    assert_same_counts(ours, theirs, len(ids), n_img)
    assert 0 < ours["image_retrieval_recall@1"] < ours["image_retrieval_recall@10"] < 1  # a meaningful case
    assert retrieval_recall(images.numpy(), texts.numpy(), ids.numpy(), ks=ks) == ours  # numpy in, same out


def test_half_and_double_inputs():
    images, texts, ids, ks, t2i, i2t = CASES["uneven caption counts"]
    expected = _keys(ks, t2i, i2t)
    assert retrieval_recall(images.half(), texts.bfloat16(), ids, ks=ks) == expected
    assert retrieval_recall(images.double(), texts, ids, ks=ks) == expected


BAD = {
    "1-d images": ((torch.ones(3), I3, [0, 1, 2]), "2-D"),
    "dims differ": ((I3, torch.ones(3, 4), [0, 1, 2]), "3-d but text_emb is 4-d"),
    "no captions": ((I3, torch.ones(0, 3), []), "at least one image and one caption"),
    "id out of range": ((I3, I3, [0, 1, 3]), r"\[0, 3\)"),
    "negative id": ((I3, I3, [0, -1, 2]), r"\[0, 3\)"),
    "one id short": ((I3, I3, [0, 1]), "one image index per caption"),
    "float ids": ((I3, I3, [0.0, 1.0, 2.0]), "integers"),
    "nan": ((I3 * float("nan"), I3, [0, 1, 2]), "NaN"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_refused(name):
    args, message = BAD[name]
    with pytest.raises(ValueError, match=message):
        retrieval_recall(*args)


@pytest.mark.parametrize("ks", [(), (0,), (1, -5), (2.5,), (True,)])
def test_bad_ks_are_refused(ks):
    with pytest.raises(ValueError, match="positive integers"):
        retrieval_recall(I3, I3, [0, 1, 2], ks=ks)


def test_importable_without_the_train_extra():
    """The metric is pure torch/numpy: no matplotlib, webdataset, yaml, open_clip or transformers."""
    code = ("import sys, training.metrics; heavy = {'matplotlib', 'webdataset', 'yaml', 'open_clip', "
            "'transformers', 'fsspec'} & set(sys.modules); assert not heavy, heavy")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr

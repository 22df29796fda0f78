"""The training loader: rows gathered from several shards' memmaps come back in the order asked for."""
import numpy as np
import pytest
import torch

from dinov2clip.dinov2 import pool
from training.data import EmbeddingSet
from training.shards import ARRAYS, write_shard


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """Three shards of 7, 5 and 9 rows; every value names its global row and column."""
    root = tmp_path_factory.mktemp("emb")
    dims = {"dinov2_cls": 6, "dinov2_patch_mean": 6, "clip_image": 4, "clip_text": 4}
    whole = {k: [] for k in ARRAYS}
    start = 0
    for s, n in enumerate((7, 5, 9)):
        arrays = {k: (np.arange(start, start + n)[:, None] * 10 + np.arange(d)[None] + i * 0.25).astype(np.float16)
                  for i, (k, d) in enumerate(dims.items())}
        write_shard(root, f"s{s}", arrays, [str(start + i) for i in range(n)], [""] * n,
                    {"num_patches": 3, "skipped": 0, "skipped_keys": {}})
        for k in ARRAYS:
            whole[k].append(arrays[k])
        start += n
    return root, {k: np.concatenate(v) for k, v in whole.items()}


@pytest.mark.parametrize("index", [[0, 1, 2], [20, 3, 7, 7, 12, 0, 19, 6], list(range(21))[::-1], []])
def test_rows_in_the_order_asked(stored, index):
    root, whole = stored
    rows = EmbeddingSet([root], "mean").rows(index)
    for k in ARRAYS:
        np.testing.assert_array_equal(rows[k], whole[k][np.asarray(index, dtype=int)].reshape(-1, whole[k].shape[1]))


def test_batch_pools_and_matches_resident(stored):
    root, whole = stored
    index = np.array([20, 3, 7, 12, 0])
    for pooling in ("mean", "cls", "cls+mean"):
        x, img, txt = EmbeddingSet([root], pooling).batch(index)
        cls, pm = (torch.from_numpy(whole[k][index]).float() for k in ("dinov2_cls", "dinov2_patch_mean"))
        torch.testing.assert_close(x, pool(cls, pm, pooling, 3))
        torch.testing.assert_close(txt, torch.from_numpy(whole["clip_text"][index]).float())
        resident = EmbeddingSet([root], pooling, resident=True).batch(index)
        for a, b in zip((x, img, txt), resident):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("index", [[21], [-1], [0, 30]])
def test_out_of_range_rows_raise(stored, index):
    with pytest.raises(IndexError, match="out of range"):
        EmbeddingSet([stored[0]], "mean").rows(index)

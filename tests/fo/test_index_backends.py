"""Index backends: the default choice by size, and the sklearn index whose vectors stay in memory between App
requests (fiftyone_dinov2clip.vector_cache).

Each "request" here is what FiftyOne's App server does: a dataset object with an empty brain-results cache,
`load_brain_results` through FiftyOne, then `sort_by_similarity`. Every answer is checked against a brute-force
cosine ranking of what MongoDB holds at that moment, after adds, deletes and edits."""
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fiftyone.brain", reason="fiftyone is not installed (pip install '.[fiftyone]')")

import fiftyone as fo  # noqa: E402
import fiftyone.brain as fob  # noqa: E402

from fiftyone_dinov2clip import vector_cache  # noqa: E402
from fiftyone_dinov2clip.brain import similarity_backend  # noqa: E402

DIM = 16


@pytest.fixture
def dataset():
    rng = np.random.default_rng(0)
    ds = fo.Dataset(f"dinov2clip-vc-{uuid.uuid4().hex[:8]}")
    ds.add_samples([fo.Sample(filepath=f"/nowhere/{i}.jpg", e=rng.standard_normal(DIM).astype(np.float32))
                    for i in range(60)])
    fob.compute_similarity(ds, embeddings="e", brain_key="cached", **similarity_backend("sklearn"))
    fob.compute_similarity(ds, embeddings="e", backend="sklearn", brain_key="stock")
    vector_cache.clear()
    yield ds
    ds.delete()


def request(ds, query, brain_key="cached", k=5) -> list[str]:
    """One App request: a dataset whose results cache is empty, then FiftyOne's own sort."""
    ds.clear_cache()
    return ds.sort_by_similarity(query, k=k, brain_key=brain_key).values("id")


def brute_force(ds, query, k=5) -> list[str]:
    return brute_force_of(ds, "e", query, k)


def test_vectors_are_read_once_and_answers_equal_the_stock_backend(dataset):
    assert type(dataset.get_brain_info("cached").config).__name__ == "CachedSklearnSimilarityConfig"
    q = np.random.default_rng(1).standard_normal(DIM)
    loads = vector_cache.stats["loads"]
    answers = [request(dataset, q) for _ in range(4)]
    assert vector_cache.stats["loads"] == loads + 1, "each request re-read the vectors from MongoDB"
    assert all(a == answers[0] for a in answers)
    assert answers[0] == brute_force(dataset, q) == request(dataset, q, brain_key="stock")
    assert request(dataset, q.tolist()) == answers[0]  # a vector as the App sends it: JSON, float64


def test_adds_deletes_and_edits_are_seen_by_the_next_request(dataset):
    rng = np.random.default_rng(2)
    q = rng.standard_normal(DIM).astype(np.float32)
    request(dataset, q)  # fills the cache

    new = fo.Sample(filepath="/nowhere/new.jpg", e=q.copy())  # the best possible match
    dataset.add_sample(new)
    assert request(dataset, q)[0] == new.id
    assert request(dataset, q) == brute_force(dataset, q)

    dataset.delete_samples([new.id])
    got = request(dataset, q)
    assert new.id not in got and got == brute_force(dataset, q)

    last = dataset.skip(59).first()  # an existing sample edited to match the query exactly
    last["e"] = q.copy()
    last.save()
    assert request(dataset, q)[0] == last.id

    dataset.set_values("e", [-v for v in dataset.values("e")])  # every vector at once
    assert request(dataset, q) == brute_force(dataset, q)


def test_index_edits_never_touch_the_shared_arrays(dataset):
    """FiftyOne's add_to_index writes rows in place; the cached arrays are shared by every loaded index."""
    q = np.random.default_rng(3).standard_normal(DIM).astype(np.float32)
    request(dataset, q)
    dataset.clear_cache()
    index = dataset.load_brain_results("cached")
    other = dataset.load_brain_results("cached", cache=False)
    before = other.embeddings.copy()
    target = dataset.values("id")[7]
    index.add_to_index(q[None, :], [target])  # an existing sample: FiftyOne's in-place path
    assert np.array_equal(other.embeddings, before), "an index edit changed another index's vectors"
    assert request(dataset, q)[0] == target
    index.remove_from_index(sample_ids=[target])
    assert target not in request(dataset, q, k=60)


def test_image_queries_leave_the_shared_vectors_as_they_were(dataset):
    """FiftyOne's sklearn index centres its vectors in place for an image (sample id) query on ≤ 15k samples."""
    ids = dataset.values("id")
    q = np.random.default_rng(4).standard_normal(DIM)
    want = request(dataset, q)
    by_id = request(dataset, [ids[3]])
    assert by_id == request(dataset, [ids[3]], brain_key="stock")
    assert request(dataset, q) == want == brute_force(dataset, q)


def test_the_default_backend_follows_the_dataset_size(monkeypatch, caplog):
    import importlib.util

    from fiftyone_dinov2clip import brain

    assert brain.default_backend(brain.LANCEDB_FROM - 1) == "sklearn"
    assert similarity_backend(None, 10) == {"backend": "sklearn",
                                            "config_cls": vector_cache.CachedSklearnSimilarityConfig}
    pytest.importorskip("lancedb")
    assert brain.default_backend(brain.LANCEDB_FROM) == "lancedb"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lancedb"
                        else real_find_spec(name, *a))
    assert brain.default_backend(brain.LANCEDB_FROM) == "sklearn"
    assert "pip install lancedb" in caplog.text
    monkeypatch.setattr(fob.brain_config, "default_similarity_backend", "lancedb")
    assert brain.default_backend(1) == "lancedb", "the user's own FiftyOne default is overridden"


def test_a_large_dataset_gets_a_lancedb_index_that_answers_text(tmp_path, zoo_tiny, monkeypatch):
    """End to end through compute_similarity with the threshold lowered to this small dataset's size."""
    pytest.importorskip("lancedb")
    from PIL import Image

    import fiftyone_dinov2clip as fod
    from fiftyone_dinov2clip import brain

    monkeypatch.setattr(brain, "LANCEDB_FROM", 4)
    ds = fo.Dataset(f"dinov2clip-large-{uuid.uuid4().hex[:8]}")
    try:
        for i, rgb in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]):
            Image.new("RGB", (32, 32), rgb).save(tmp_path / f"{i}.png")
            ds.add_sample(fo.Sample(filepath=str(tmp_path / f"{i}.png")))
        fod.compute_similarity(ds, zoo_tiny)
        config = ds.get_brain_info("dinov2clip").config
        assert type(config).__name__ == "CachedLanceDBSimilarityConfig"
        assert in_configured_uri(ds, "dinov2clip"), "the user's LanceDB uri was ignored"
        model = fod.load(zoo_tiny)
        q = np.asarray(model.embed_prompt("a red square"), np.float64)
        assert fod.sort_by_text(ds, "a red square", k=4).values("id") == brute_force_of(ds, "dinov2clip", q, 4)
    finally:
        ds.delete()


def brute_force_of(ds, field, query, k):
    ids, emb = ds.values("id"), np.stack(ds.values(field)).astype(np.float64)
    cos = emb @ query / np.linalg.norm(emb, axis=1) / np.linalg.norm(query)
    return [ids[i] for i in np.argsort(-cos)[:k]]


def in_configured_uri(ds, brain_key) -> bool:
    """Whether the index's table is where the user's brain config (here: devdb's variable) puts LanceDB's."""
    table = ds.get_brain_info(brain_key).config.table_name
    return (Path(os.environ["FIFTYONE_BRAIN_SIMILARITY_LANCEDB_URI"]) / f"{table}.lance").is_dir()


def lance_pair(ds, metric: str) -> tuple[str, str]:
    """Ours and FiftyOne's own LanceDB index over the same vectors; → their brain keys."""
    for key, backend in ((f"lance_{metric}", similarity_backend("lancedb")), (f"stock_{metric}", {"backend": "lancedb"})):
        fob.compute_similarity(ds, embeddings="e", brain_key=key, metric=metric,
                               table_name=f"{key}_{uuid.uuid4().hex[:8]}", **backend)
        assert in_configured_uri(ds, key), "the user's LanceDB uri was ignored"
    return f"lance_{metric}", f"stock_{metric}"


def ranked(view, query, brain_key, k=5) -> tuple[list[str], list[float]]:
    view._dataset.clear_cache()  # a fresh request
    out = view.sort_by_similarity(query, k=k, brain_key=brain_key, dist_field="d")
    return out.values("id"), out.values("d")


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_lancedb_views_and_id_queries_are_answered_from_memory_as_lancedb_would(dataset, metric):
    pytest.importorskip("lancedb")
    ours, stock = lance_pair(dataset, metric)
    assert type(dataset.get_brain_info(ours).config).__name__ == "CachedLanceDBSimilarityConfig"
    q = np.random.default_rng(3).standard_normal(DIM).astype(np.float32)
    view = dataset.skip(7).limit(30)  # a sidebar filter, or searching within earlier results
    loads = vector_cache.stats["loads"]
    got = [ranked(view, q, ours) for _ in range(3)]
    assert vector_cache.stats["loads"] == loads + 1, "each view query re-read the table"
    want = ranked(view, q, stock)
    assert got[0][0] == want[0]
    assert np.allclose(got[0][1], want[1], rtol=1e-4, atol=1e-5), (got[0][1], want[1])
    if metric == "cosine":
        assert got[0][0] == brute_force_of(view, "e", q.astype(np.float64), 5)
    first = view.first().id  # an image query from the App: by sample id
    assert ranked(view, first, ours)[0] == ranked(view, first, stock)[0]
    assert ranked(dataset, first, ours)[0] == ranked(dataset, first, stock)[0]
    hits = vector_cache.stats["hits"]
    whole = ranked(dataset, q, ours)  # the whole dataset: from memory too, the table fitting the budget
    assert vector_cache.stats["hits"] > hits, "a whole-table search did not use the vectors in memory"
    want = ranked(dataset, q, stock)
    assert whole[0] == want[0]
    assert np.allclose(whole[1], want[1], rtol=1e-4, atol=1e-5), (whole[1], want[1])
    tables = dataset.load_brain_results(ours)._db.table_names()
    assert not [t for t in tables if t.startswith(ours) and t.endswith("_filter")], tables

    # A new vector in the table (a new table version) is seen by the next view query.
    new = fo.Sample(filepath="/nowhere/new.jpg", e=q)
    dataset.add_sample(new)
    for key in (ours, stock):
        dataset.load_brain_results(key).add_to_index(q[None], [new.id])
    assert ranked(dataset.skip(7), q, ours)[0][0] == new.id == ranked(dataset.skip(7), q, stock)[0][0]
    assert ranked(dataset, q, ours)[0][0] == new.id  # and by the next whole-table search


def test_a_lancedb_table_over_the_memory_budget_is_searched_by_lancedb(dataset, monkeypatch):
    """Within `DINOV2CLIP_VECTOR_CACHE_MB` the first whole-table search reads the vectors and the next one
    searches them in memory; past it nothing is read and LanceDB scans its table. The answers are LanceDB's."""
    pytest.importorskip("lancedb")
    ours, stock = lance_pair(dataset, "cosine")
    q = np.random.default_rng(5).standard_normal(DIM).astype(np.float32)
    want = ranked(dataset, q, stock)
    loads, hits = vector_cache.stats["loads"], vector_cache.stats["hits"]
    first, later = ranked(dataset, q, ours), ranked(dataset, q, ours)
    assert (vector_cache.stats["loads"], vector_cache.stats["hits"]) == (loads + 1, hits + 1)
    assert first[0] == later[0] == want[0]
    assert np.allclose(later[1], want[1], rtol=1e-4, atol=1e-5), (later[1], want[1])

    new = fo.Sample(filepath="/nowhere/new.jpg", e=q)  # a new table version, over a tiny budget
    dataset.add_sample(new)
    for key in (ours, stock):
        dataset.load_brain_results(key).add_to_index(q[None], [new.id])
    monkeypatch.setattr(vector_cache, "CACHE_BYTES", len(dataset) * DIM * 4 - 1)
    on_disk = ranked(dataset, q, ours)
    assert vector_cache.stats["loads"] == loads + 1, "a table over the budget was read"
    assert on_disk[0] == ranked(dataset, q, stock)[0] and on_disk[0][0] == new.id


def test_lancedb_patch_indexes_answer_as_lancedb_would(dataset):
    """An index of object patches (label ids in the table, their samples beside them): searched from memory,
    whole and in a view, with FiftyOne's own LanceDB index's answers."""
    pytest.importorskip("lancedb")
    rng = np.random.default_rng(7)
    embeddings = {}
    for sample in dataset.iter_samples(autosave=True):
        sample["gt"] = fo.Detections(detections=[fo.Detection(label="thing", bounding_box=[0.1, 0.1, 0.5, 0.5])
                                                 for _ in range(2)])
        embeddings[sample.id] = rng.standard_normal((2, DIM)).astype(np.float32)
    ours, stock = "lance_patches", "stock_patches"
    for key, backend in ((ours, similarity_backend("lancedb")), (stock, {"backend": "lancedb"})):
        fob.compute_similarity(dataset, patches_field="gt", embeddings=embeddings, brain_key=key,
                               table_name=f"{key}_{uuid.uuid4().hex[:8]}", **backend)
    q = rng.standard_normal(DIM).astype(np.float32)
    hits = vector_cache.stats["hits"]
    patches = dataset.to_patches("gt")
    for view in (patches, patches.skip(9).limit(40)):
        got = ranked(view, q, ours)
        want = ranked(view, q, stock)
        assert got[0] == want[0]
        assert np.allclose(got[1], want[1], rtol=1e-4, atol=1e-5), (got[1], want[1])
    assert vector_cache.stats["hits"] > hits, "no search came from memory"


def test_row_blocks_behave_as_the_matrix_they_hold():
    """The vectors in memory stay in LanceDB's read blocks: products, squared norms and row gathers (in any
    order, repeated, across blocks) equal those of the one matrix."""
    pytest.importorskip("lancedb")
    from fiftyone_dinov2clip.lancedb_index import RowBlocks

    rng = np.random.default_rng(11)
    matrix = rng.standard_normal((103, 8)).astype(np.float32)
    blocks = RowBlocks([matrix[a:b] for a, b in ((0, 40), (40, 41), (41, 100), (100, 103))])
    q = rng.standard_normal(8).astype(np.float32)
    assert len(blocks) == 103 and blocks.nbytes == matrix.nbytes
    assert np.allclose(blocks @ q, matrix @ q, rtol=1e-6, atol=1e-6)
    assert np.allclose(blocks.squares(), (matrix ** 2).sum(axis=1), rtol=1e-5)
    rows = np.array([102, 0, 40, 40, 39, 41, 5, 101])
    assert np.array_equal(blocks[rows], matrix[rows])
    assert np.array_equal(blocks[40], matrix[40]) and np.array_equal(blocks[np.int64(102)], matrix[102])
    assert blocks[np.array([], np.int64)].shape == (0, 8)

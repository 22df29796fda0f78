"""Index backends: the default choice by size, and FiftyOne's own backends as dinov2clip builds them answering
from what MongoDB holds now.

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


DIM = 16


@pytest.fixture
def dataset():
    rng = np.random.default_rng(0)
    ds = fo.Dataset(f"dinov2clip-vc-{uuid.uuid4().hex[:8]}")
    ds.add_samples([fo.Sample(filepath=f"/nowhere/{i}.jpg", e=rng.standard_normal(DIM).astype(np.float32))
                    for i in range(60)])
    fob.compute_similarity(ds, embeddings="e", backend="sklearn", brain_key="cached")
    yield ds
    ds.delete()


def request(ds, query, brain_key="cached", k=5) -> list[str]:
    """One App request: a dataset whose results cache is empty, then FiftyOne's own sort."""
    ds.clear_cache()
    return ds.sort_by_similarity(query, k=k, brain_key=brain_key).values("id")


def brute_force(ds, query, k=5) -> list[str]:
    return brute_force_of(ds, "e", query, k)


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


def test_the_default_backend_follows_the_dataset_size(monkeypatch, caplog):
    import importlib.util

    from fiftyone_dinov2clip import brain

    assert brain.default_backend(brain.LANCEDB_FROM - 1) == "sklearn"
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
        assert type(config).__name__ == "LanceDBSimilarityConfig"
        assert in_configured_uri(ds, "dinov2clip"), "the user's LanceDB uri was ignored"
        if brain._brain_version() >= (0, 27):  # exact by default: no approximate vector index, however large
            assert config.min_index_rows == brain.NEVER
        model = fod.load(zoo_tiny)
        q = np.asarray(model.embed_prompt("a red square"), np.float64)
        assert fod.sort_by_text(ds, "a red square", k=4).values("id") == brute_force_of(ds, "dinov2clip", q, 4)
    finally:
        ds.delete()


def test_lancedb_as_dinov2clip_builds_it_is_exact_and_an_asked_for_ann_index_reports_its_recall():
    """fiftyone-brain 0.27 builds an approximate index from 2,048 rows by default: dinov2clip's own arguments
    keep its indexes exact; an index the caller asks for (`index_type`) is measured against exact search."""
    pytest.importorskip("lancedb")
    from fiftyone_dinov2clip import brain

    rng = np.random.default_rng(5)
    ds = fo.Dataset(f"dinov2clip-ann-{uuid.uuid4().hex[:8]}")
    try:
        ds.add_samples([fo.Sample(filepath=f"/nowhere/{i}.jpg", e=v) for i, v in
                        enumerate(rng.standard_normal((2500, 64)).astype(np.float32))])
        fob.compute_similarity(ds, embeddings="e", backend="lancedb", brain_key="exact",
                               **brain.exact_search("lancedb", {}))
        exact = brain.measured_recall(ds, "e", "exact", k=25, queries=20)
        assert exact == {"k": 25, "queries": 20, "recall": 1.0}
        for q in rng.standard_normal((5, 64)):
            assert request(ds, q, "exact", k=25) == brute_force_of(ds, "e", q, 25)
        asked = {"index_type": "ivf_pq"} if brain._brain_version() >= (0, 27) else {}
        assert brain.approximate("lancedb", asked) == bool(asked)
        fob.compute_similarity(ds, embeddings="e", backend="lancedb", brain_key="ann", **asked)
        recall = brain.measured_recall(ds, "e", "ann", k=25, queries=20)["recall"]
        assert 0 < recall <= 1 and (recall < 1 or not asked)  # random vectors: ANN's worst case
    finally:
        ds.delete()


def brute_force_of(ds, field, query, k):
    ids, emb = ds.values("id"), np.stack(ds.values(field)).astype(np.float64)
    cos = emb @ query / np.linalg.norm(emb, axis=1) / np.linalg.norm(query)
    return [ids[i] for i in np.argsort(-cos)[:k]]


def in_configured_uri(ds, brain_key) -> bool:
    """Whether the index's table is where the user's brain config (here: tests/support/devdb.py's variable) puts LanceDB's."""
    table = ds.get_brain_info(brain_key).config.table_name
    return (Path(os.environ["FIFTYONE_BRAIN_SIMILARITY_LANCEDB_URI"]) / f"{table}.lance").is_dir()


@pytest.mark.parametrize("backend", ["sklearn", "lancedb"])
def test_index_contract_on_the_installed_fiftyone_brain(backend, zoo_tiny, image_folder):
    """What every default backend dinov2clip builds must do on the fiftyone-brain installed (CI runs this on the
    pinned release and on the newest one): get_embeddings, remove_from_index, add_to_index, and text and vector
    sorts equal to a brute-force ranking of what the index holds."""
    import fiftyone_dinov2clip as fod

    if backend == "lancedb":
        pytest.importorskip("lancedb")
    ds = fo.Dataset(f"dinov2clip-contract-{uuid.uuid4().hex[:8]}")
    try:
        ds.add_samples([fo.Sample(filepath=str(p)) for p in sorted(image_folder.iterdir())
                        if p.name != "corrupt.jpg"])
        results, _ = fod.compute_similarity(ds, zoo_tiny, backend=backend, brain_key="contract")
        ids = ds.values("id")
        stored = np.stack(ds.values("dinov2clip")).astype(np.float32)
        got, got_ids, _ = results.get_embeddings()
        order = [list(got_ids).index(i) for i in ids]
        np.testing.assert_allclose(np.asarray(got)[order], stored, rtol=1e-5, atol=1e-6)

        model = fod.load(zoo_tiny)
        q = np.asarray(model.embed_prompt("a red square"), np.float64)
        assert fod.sort_by_text(ds, "a red square", brain_key="contract", k=4).values("id") == \
            brute_force_of(ds, "dinov2clip", q, 4)
        assert ds.sort_by_similarity(stored[2], brain_key="contract", k=3).values("id") == \
            brute_force_of(ds, "dinov2clip", stored[2].astype(np.float64), 3)

        gone = ids[0]
        results.remove_from_index(sample_ids=[gone])
        results.save()
        ds.clear_cache()
        left = ds.sort_by_similarity(stored[0], brain_key="contract", k=len(ids)).values("id")
        assert gone not in left and len(left) == len(ids) - 1
        results = ds.load_brain_results("contract")
        results.add_to_index(stored[:1], [gone])
        results.save()
        ds.clear_cache()
        assert ds.sort_by_similarity(stored[0], brain_key="contract", k=1).values("id") == [gone]
    finally:
        ds.delete()

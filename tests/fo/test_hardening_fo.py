"""Right answers or none (issue 24), on the FiftyOne side: rebuilt LanceDB indexes keep their tables apart and
leave none behind, one field or key never serves both spaces, an index answers from what it holds now (after
a rebuild, or an edit by another process), non-finite vectors are never written or searched with, and bad
operator input gets one line the App shows. Real mongod, real LanceDB, real second processes."""
import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fiftyone.brain", reason="fiftyone is not installed (pip install '.[fiftyone]')")

import fiftyone as fo  # noqa: E402

import fiftyone_dinov2clip as fod  # noqa: E402
from dinov2clip.errors import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
COLOURS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200), (200, 0, 200)]


@pytest.fixture
def dataset(tmp_path):
    """Six tiny solid-colour images."""
    ds = fo.Dataset(f"hardening-{uuid.uuid4().hex[:8]}")
    for i, rgb in enumerate(COLOURS):
        Image.new("RGB", (24, 24), rgb).save(tmp_path / f"{i}.png")
        ds.add_sample(fo.Sample(filepath=str(tmp_path / f"{i}.png")))
    yield ds
    ds.delete()


def brute_force(ds, field, query, k):
    ids, emb = ds.exists(field).values(["id", field])
    emb = np.stack(emb).astype(np.float64)
    cos = emb @ query / np.linalg.norm(emb, axis=1) / np.linalg.norm(query)
    return [ids[i] for i in np.argsort(-cos)[:k]]


def request(ds, query, brain_key, k):
    """What the App server does per request: a dataset object with no results cached, then FiftyOne's sort."""
    ds._root_dataset.clear_cache()
    return ds.sort_by_similarity(query, k=k, brain_key=brain_key).values("id")


def lance_tables(root: Path) -> list[str]:
    """Every LanceDB table under root, at any depth, as paths relative to it."""
    tables = (str(p.relative_to(root)) for p in root.rglob("*.lance") if p.is_dir())
    return sorted(t for t in tables if ".lance/" not in t)  # not a table's own data files


# -- 1. rebuilding LanceDB indexes -----------------------------------------------------------------
def lance_folder(root: Path, names: list[str], monkeypatch) -> list[str]:
    """root, holding these tables, as the user's LanceDB folder (FiftyOne's brain config: every process)."""
    import fiftyone.brain as fob
    import lancedb

    monkeypatch.setitem(fob.brain_config.similarity_backends["lancedb"], "uri", str(root))
    db = lancedb.connect(str(root))
    for i, name in enumerate(names):
        db.create_table(name, data=[{"id": str(i), "vector": [float(i), 1.0]}])
    return lance_tables(root)


def test_twenty_lancedb_rebuilds_keep_both_indexes_and_leave_no_orphan_tables(dataset, zoo_tiny, tmp_path,
                                                                              monkeypatch):
    """A LanceDB folder already holding 12 tables (named as FiftyOne names its own), where LanceDB's
    `table_names()` lists 10: each rebuild must drop the tables it replaces, and the two indexes must never
    share one."""
    pytest.importorskip("lancedb")
    root = tmp_path / "lancedb"
    unrelated = lance_folder(root, [f"fiftyone-other-dataset-{i}" for i in range(12)], monkeypatch)
    assert len(unrelated) == 12

    for _ in range(20):
        fod.compute_similarity(dataset, zoo_tiny, backend="lancedb", dinov2_field="dino",
                               dinov2_brain_key="dino_sim", overwrite=True)

    tables = {k: dataset.get_brain_info(k).config.table_name for k in ("dinov2clip", "dino_sim")}
    assert tables["dinov2clip"] != tables["dino_sim"], tables
    assert sorted(lance_tables(root)) == sorted([*unrelated, *(f"{t}.lance" for t in tables.values())])  # 12 + 2

    dataset.clear_cache()  # as a new process: the runs loaded from the database
    q = np.asarray(fod.load(zoo_tiny).embed_prompt("a red square"), np.float64)
    assert fod.sort_by_text(dataset, "a red square", k=6).values("id") == brute_force(dataset, "dinov2clip", q, 6)
    first = dataset.first()
    dino = np.asarray(first["dino"], np.float64)
    assert request(dataset, first.id, "dino_sim", 6) == brute_force(dataset, "dino", dino, 6)


def test_a_lancedb_index_fiftyone_could_not_open_is_refused(dataset, zoo_tiny, tmp_path, monkeypatch):
    """Past 10 tables, fiftyone-brain 0.25's LanceDB index opens only the tables `table_names()` lists, and
    lancedb before 0.41 lists the first 10 (sorted names): an index whose table it would not find is refused in
    one line, and nothing of it stays. Where either finds every table, the index opens and answers."""
    lancedb = pytest.importorskip("lancedb")
    from importlib.metadata import version

    from packaging.version import Version

    root = tmp_path / "lancedb"
    unrelated = lance_folder(root, [f"a_unrelated_{i:02d}" for i in range(12)], monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # table_names(): what fiftyone-brain 0.25 calls
        lists_all = len(lancedb.connect(str(root)).table_names()) == len(unrelated)
    if lists_all or Version(version("fiftyone-brain")) >= Version("0.26"):  # 0.26 rewrote its LanceDB backend
        fod.compute_similarity(dataset, zoo_tiny, backend="lancedb")
        assert "dinov2clip" in dataset.list_brain_runs() and len(fod.sort_by_text(dataset, "a red", k=2)) == 2
        return
    with pytest.raises(UserError, match="finds only the first 10 tables of .* give LanceDB a folder of its own"):
        fod.compute_similarity(dataset, zoo_tiny, backend="lancedb")
    assert dataset.list_brain_runs() == [] and lance_tables(root) == unrelated


# -- 2. one field or key for both spaces -----------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"embeddings_field": "e", "dinov2_field": "e"}, "need two fields, not one ('e')"),
    ({"dinov2_field": "dino", "dinov2_brain_key": "dinov2clip"}, "need two brain keys, not one ('dinov2clip')"),
])
def test_one_field_or_key_for_both_spaces_is_refused_before_any_work(dataset, zoo_tiny, kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fod.compute_similarity(dataset, zoo_tiny, **kwargs)
    assert dataset.list_brain_runs() == []
    assert not {"e", "dino", "dinov2clip"} & set(dataset.get_field_schema())
    if "embeddings_field" in kwargs:
        with pytest.raises(UserError, match="need two fields"):
            fod.compute_embeddings(dataset, zoo_tiny, embeddings_field="e", dinov2_field="e")
        assert "e" not in dataset.get_field_schema()


def test_the_cli_refuses_one_field_for_both_spaces_in_one_line(dataset, zoo_tiny):
    out = subprocess.run([sys.executable, "-m", "fiftyone_dinov2clip", "index", dataset.name, "--model", zoo_tiny,
                          "--embeddings-field", "e", "--dinov2-field", "e"], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300, cwd=REPO)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "need two fields" in out.stderr, out.stderr
    dataset.reload()
    assert "e" not in dataset.get_field_schema()


# -- 3. what an index answers from -----------------------------------------------------------------
def plant(ds, field, query, n, rng) -> list[str]:
    """n samples' vectors set next to the query: the matches a right answer must find."""
    ids = ds.values("id")[:n]
    ds.set_values(field, {i: (query + 0.01 * rng.standard_normal(query.shape)).astype(np.float32) for i in ids},
                  key_field="id")
    return ids


def test_a_lancedb_index_rebuilt_under_its_name_answers_from_its_new_vectors(zoo_tiny, tmp_path, monkeypatch):
    """The process searched the old table; the index is cleaned up (its table dropped) and rebuilt under the
    same table name, over vectors where 5 planted samples now match the query."""
    pytest.importorskip("lancedb")
    rng = np.random.default_rng(0)
    ds = fo.Dataset(f"hardening-rebuilt-{uuid.uuid4().hex[:8]}")
    try:
        for i in range(12):
            Image.new("RGB", (24, 24), tuple(int(c) for c in rng.integers(0, 256, 3))).save(tmp_path / f"{i}.png")
            ds.add_sample(fo.Sample(filepath=str(tmp_path / f"{i}.png")))
        lance_folder(tmp_path / "lance", [], monkeypatch)
        kwargs = {"backend": "lancedb", "table_name": "same"}
        fod.compute_similarity(ds, zoo_tiny, **kwargs)
        dim = len(ds.first()["dinov2clip"])
        q = rng.standard_normal(dim).astype(np.float32)
        request(ds, q, "dinov2clip", 5)  # this process has searched the old table
        request(ds, ds.first().id, "dinov2clip", 5)

        planted = plant(ds, "dinov2clip", q, 5, rng)
        ds.load_brain_results("dinov2clip").cleanup()  # FiftyOne's documented way to delete an index
        ds.delete_brain_run("dinov2clip")
        fod.compute_similarity(ds, zoo_tiny, **kwargs)
        assert ds.get_brain_info("dinov2clip").config.table_name == "same"
        assert sorted(request(ds, q, "dinov2clip", 5)) == sorted(planted)
        assert sorted(request(ds.skip(1), q, "dinov2clip", 4)) == sorted(planted[1:])  # a view too
    finally:
        ds.delete()


EDIT = """
import os, sys
import numpy as np
ids, vector, how = sys.argv[1].split(","), np.asarray(eval(sys.argv[2]), np.float32), sys.argv[3]
import fiftyone as fo
ds = fo.load_dataset(sys.argv[4])
if how == "set_values":
    ds.set_values("dinov2clip", {i: vector for i in ids}, key_field="id")
else:  # a write FiftyOne never sees: no last_modified_at
    import pymongo
    from bson import ObjectId
    from fiftyone.core.utils import serialize_numpy_array
    coll = pymongo.MongoClient(os.environ["FIFTYONE_DATABASE_URI"])[os.environ["FIFTYONE_DATABASE_NAME"]][sys.argv[5]]
    done = coll.update_many({"_id": {"$in": [ObjectId(i) for i in ids]}},
                            {"$set": {"dinov2clip": serialize_numpy_array(vector)}})
    assert done.modified_count == len(ids)
"""


@pytest.mark.parametrize("how", ["set_values", "pymongo"])
def test_an_edit_by_another_process_is_seen_by_the_next_query(dataset, zoo_tiny, how):
    """sklearn (the default below 30,000 samples): a query, another process rewriting three samples' vectors to
    the query's, and the next query of this process finds exactly those three first."""
    fod.compute_similarity(dataset, zoo_tiny, backend="sklearn")
    rng = np.random.default_rng(1)
    q = rng.standard_normal(len(dataset.first()["dinov2clip"])).astype(np.float32)
    before = request(dataset, q, "dinov2clip", 3)
    targets = [i for i in dataset.values("id") if i not in before][:3]
    out = subprocess.run([sys.executable, "-c", EDIT, ",".join(targets), repr(q.tolist()), how, dataset.name,
                          dataset._doc.sample_collection_name], capture_output=True, text=True, timeout=300,
                         env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(request(dataset, q, "dinov2clip", 3)) == sorted(targets)


# -- 4. bad numbers --------------------------------------------------------------------------------
def test_non_finite_vectors_are_never_written(dataset, zoo_tiny):
    fod.compute_embeddings(dataset, zoo_tiny, embeddings_field="clip", dinov2_field="dino")
    ids = dataset.values("id")
    dino = dataset.first()["dino"].copy()
    dino[0] = np.nan
    dataset.set_values("dino", {ids[0]: dino, ids[2]: np.full_like(dino, np.inf)}, key_field="id")
    with pytest.raises(UserError, match=rf"2 non-finite embeddings for field 'dino' \(e.g. {ids[0]}, {ids[2]}\)"):
        fod.project_field(dataset, "dino", zoo_tiny, embeddings_field="projected")
    assert dataset.exists("projected").count() == 0


def test_a_query_that_is_no_text_is_refused_in_one_line(dataset, zoo_tiny):
    fod.compute_similarity(dataset, zoo_tiny)
    for query in ("", "   ", None, 3, ["a dog"]):
        with pytest.raises(UserError, match="a text query must be a non-empty string"):
            fod.sort_by_text(dataset, query)
    for k in (0, -1, 2.5, True):
        with pytest.raises(UserError, match="k must be a whole number, at least 1"):
            fod.sort_by_text(dataset, "a dog", k=k)
    sample_id = dataset.first().id  # a text that looks like a sample id is still a text
    assert len(fod.sort_by_text(dataset, sample_id, k=6)) == 6


def blind_model_dir(out: Path) -> Path:
    """make_tiny's random model, but with CLIP's text projection all zeros: every text encodes to a zero (or, once
    normalised, a NaN) vector."""
    import torch
    from open_clip.model import CLIP
    from transformers import Dinov2Config, Dinov2Model

    from dinov2clip import modeldir as md
    from dinov2clip.clip_text import save_clip

    torch.manual_seed(0)
    spec = md.RANDOM_SIZES["tiny"]
    dinov2_cfg = Dinov2Config(image_size=224, patch_size=14, **spec["dinov2"])
    backbone, clip_model = Dinov2Model(dinov2_cfg).eval(), CLIP(**md.TINY_CLIP_CFG).eval()
    with torch.no_grad():
        clip_model.text_projection.zero_()
    projector = md.ProjectorWithResiduals(md.pooled_dim(dinov2_cfg.hidden_size, "mean"),
                                          md.TINY_CLIP_CFG["embed_dim"], *spec["projector"]).eval()
    config = md.ModelConfig(
        dinov2={"source": "dinov2", "pooling": "mean", "class": "Dinov2Model", "hidden_size": dinov2_cfg.hidden_size,
                "origin": f"sha256:{md.tensor_sha256(backbone.state_dict())}"},
        clip={"model_name": spec["clip"], "pretrained": None, "embed_dim": md.TINY_CLIP_CFG["embed_dim"],
              "quick_gelu": True, "origin": f"sha256:{md.tensor_sha256(clip_model.state_dict())}"},
        projector={}, license=md.TINY_LICENSE, provenance={"recipe": "blind text tower (test)", "seed": 0})

    def add_parts(tmp: Path, cfg) -> None:
        backbone.save_pretrained(tmp / "dinov2", safe_serialization=True)
        save_clip(clip_model, md.TINY_CLIP_CFG, tmp / "clip")
        cfg.dinov2 = {**cfg.dinov2, "path": "dinov2"}
        cfg.clip = {**cfg.clip, "path": "clip"}

    return md.save_model_dir(config, projector, out, False, extra=add_parts)


def test_a_text_that_encodes_to_no_direction_is_refused_in_one_line(dataset, zoo_tiny, tmp_path):
    from fiftyone_dinov2clip import registry

    blind = registry.register("dinov2clip-test-blind", str(blind_model_dir(tmp_path / "blind")))
    fod.compute_similarity(dataset, blind)
    with pytest.raises(UserError, match=r"^the query 'a dog' encodes to a (zero|non-finite) vector, which ranks "):
        fod.sort_by_text(dataset, "a dog")
    # FiftyOne's own text search (the App's magnifier) goes through the model: refused there too
    with pytest.raises(UserError, match=r"^the query 'a cat' encodes to a (zero|non-finite) vector, which ranks "):
        dataset.sort_by_similarity("a cat", k=2, brain_key="dinov2clip")


# -- 5. operator input -----------------------------------------------------------------------------
PLUGIN = "@dinov2clip/dinov2clip"
COMPUTE = f"{PLUGIN}/compute_dinov2clip_similarity"
QUERY = f"{PLUGIN}/dinov2clip_text_query"


@pytest.fixture(scope="module")
def plugin(mongod):
    """The plugin as FiftyOne finds it in its plugins folder: fiftyone.yml and the one-line entry file."""
    dest = Path(os.environ["FIFTYONE_PLUGINS_DIR"]) / "dinov2clip-hardening"
    (dest / "fiftyone_dinov2clip").mkdir(parents=True)
    shutil.copy(REPO / "fiftyone.yml", dest / "fiftyone.yml")
    shutil.copy(REPO / "fiftyone_dinov2clip" / "plugin.py", dest / "fiftyone_dinov2clip" / "plugin.py")
    yield dest
    shutil.rmtree(dest)


def run_operator(uri: str, dataset, **params):
    """The ExecutionResult, as the App server's POST /operators/execute gets it: an exception here is its
    HTTP 500, which the App shows as no message."""
    from fiftyone.operators.executor import execute_or_delegate_operator

    request = {"dataset_name": dataset.name, "view": None, "params": params, "request_delegation": False}
    return asyncio.run(execute_or_delegate_operator(uri, request))


@pytest.mark.parametrize("uri, params, message", [
    (QUERY, {"query": "a dog", "k": 0}, "k must be a whole number, at least 1, or None, not 0"),
    (QUERY, {"query": "a dog", "k": -3}, "k must be a whole number, at least 1, or None, not -3"),
    (QUERY, {"query": ""}, "a text query must be a non-empty string, not ''"),
    (QUERY, {"query": 7}, "a text query must be a non-empty string, not 7"),
    (QUERY, {}, "a text query must be a non-empty string, not None"),
    (COMPUTE, {"model": "{zoo}", "batch_size": 0}, "batch_size must be a whole number, at least 1, or None, not 0"),
    (COMPUTE, {"model": "{zoo}", "backend": "nope"}, "unknown similarity backend 'nope' (FiftyOne's: "),
    (COMPUTE, {"model": "{zoo}", "dinov2_field": "dinov2clip"}, "the CLIP-space and the DINOv2 embeddings need"),
    (COMPUTE, {}, "choose a registered dinov2clip model, not None"),
])
def test_bad_operator_input_is_one_line_the_app_shows(plugin, dataset, zoo_tiny, uri, params, message):
    fod.compute_similarity(dataset, zoo_tiny, brain_key="text")
    params = {k: v.format(zoo=zoo_tiny) if isinstance(v, str) else v for k, v in params.items()}
    if uri == QUERY:
        params["brain_key"] = "text"
    result = run_operator(uri, dataset, **params)
    assert result.error_message is not None and result.error_message.startswith(message), result.error_message
    assert "\n" not in result.error_message and "UserError" in result.error
    assert dataset.list_brain_runs() == ["text"]
    json.dumps(result.to_json())  # what the server sends back

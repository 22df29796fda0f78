"""The zoo model, the registry and the brain helpers, against a real mongod and real FiftyOne."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

# the clip-retrieval environment has no FiftyOne (and CI requires it in the main one: see conftest)
pytest.importorskip("fiftyone.zoo", reason="fiftyone is not installed (pip install '.[fiftyone]')")

import fiftyone as fo
import fiftyone.zoo as foz

import dinov2clip
import fiftyone_dinov2clip as fod
from dinov2clip.errors import UserError
from fiftyone_dinov2clip import registry
from fiftyone_dinov2clip.zoo import DinoV2ClipModel

REPO = Path(__file__).resolve().parents[2]


def make_images(root: Path) -> list[Path]:
    """Eight files: plain RGB, EXIF-rotated, palette, 16-bit, CMYK, RGBA, grey — and one corrupt."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    paths = []

    def save(name, img, **kw):
        path = root / name
        img.save(path, **kw)
        paths.append(path)

    save("rgb.jpg", base, quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated: the pipeline must apply it
    save("exif.jpg", base, exif=exif, quality=95)
    save("palette.png", base.convert("P", palette=Image.ADAPTIVE))
    save("sixteen.png", Image.fromarray((rng.integers(0, 65535, (80, 80))).astype(np.uint16)))
    save("cmyk.jpg", base.convert("CMYK"), quality=95)
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    save("rgba.png", rgba)
    save("grey.png", base.convert("L"))
    bad = root / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths.append(bad)
    return paths


@pytest.fixture()
def dataset(tmp_path, request):
    paths = make_images(tmp_path / "images")
    ds = fo.Dataset(f"t-{request.node.name[:40]}-{os.getpid()}")
    ds.add_samples([fo.Sample(filepath=str(p)) for p in paths])
    yield ds
    ds.delete()


def cosine_rows(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_loaded_by_name_is_lazy_and_embeds_prompts(zoo_tiny, tiny_model):
    model = foz.load_zoo_model(zoo_tiny, cache=False)
    assert isinstance(model, DinoV2ClipModel)
    assert model.can_embed_prompts and model.config.zoo_name == zoo_tiny
    got = model.embed_prompts(["a red circle", "a dog"])
    assert model._core is None and model._text.image_encoder is None, \
        "a text query must load neither the DINOv2 tower nor the projector"
    assert model._text.text_encoder.clip.visual is None
    # dtype "auto" may run bf16 here; the space is the same one
    assert cosine_rows(got, tiny_model.encode_text(["a red circle", "a dog"])).min() > 0.999
    prefixed = foz.load_zoo_model(zoo_tiny, cache=False, query_prefix="a photo of ", dtype="fp32")
    np.testing.assert_allclose(prefixed.embed_prompt("a dog"),
                               tiny_model.encode_text(["a photo of a dog"])[0].numpy(), atol=1e-5)


def test_a_fresh_instance_per_request_reuses_the_text_tower(zoo_tiny, tiny_dir, tmp_path, monkeypatch):
    """The App server loads the zoo model anew for every request: the text tower is built once per process
    and its weight files hashed once, while a model whose weights changed on disk is never served stale."""
    import dinov2clip.config as core_config
    import dinov2clip.factory as factory

    builds, hashes = [], []
    real_read, real_hash = factory._read_clip, core_config.file_sha256
    monkeypatch.setattr(factory, "_read_clip", lambda *a, **k: builds.append(a) or real_read(*a, **k))
    monkeypatch.setattr(factory, "file_sha256", lambda p, *a: hashes.append(p) or real_hash(p, *a))
    factory._TEXT_TOWERS.clear()
    factory._FILE_HASHES.clear()
    first = [foz.load_zoo_model(zoo_tiny, cache=False).embed_prompt("a red circle") for _ in range(3)]
    assert len(builds) == 1, "each request rebuilt the text tower"
    assert len(hashes) == len(set(hashes)), "a weight file was hashed again"
    assert all(np.array_equal(first[0], f) for f in first[1:])

    # other weights, re-saved as a model directory would be: another model, built anew, never the cached one
    changed = tmp_path / "changed"
    dinov2clip.bundle(str(tiny_dir), str(changed))  # (builds a whole CLIP to copy it)
    n = len(builds)
    before = dinov2clip.load_encoders(str(changed), image=False, device="cpu", dtype="fp32").encode_text(["a dog"])
    assert len(builds) == n + 1
    from safetensors.torch import load_file, save_file

    from dinov2clip.modeldir import finish_config

    weights = changed / "clip" / "open_clip_model.safetensors"
    state = load_file(str(weights))
    save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()}, str(weights))
    config = dinov2clip.config.read_config(changed)
    finish_config(config, changed)  # records the new hashes, as a re-save does
    after = dinov2clip.load_encoders(str(changed), image=False, device="cpu", dtype="fp32").encode_text(["a dog"])
    assert len(builds) == n + 2 and not torch.allclose(before, after), "served a text tower whose weights changed"
    assert len(factory._TEXT_TOWERS) <= factory.TEXT_TOWER_CACHE_SIZE


def test_parity_and_one_bad_image_costs_one_sample(dataset, zoo_tiny, tiny_model):
    """Eight images in one batch, one corrupt: dinov2clip's own loop writes seven embeddings equal to the
    core's and names the one failure."""
    report = fod.compute_embeddings(dataset, zoo_tiny, "emb", dinov2_field="dino", batch_size=8)
    assert report.embedded == 7
    filepaths, emb = dataset.values(["filepath", "emb"])
    assert [p for p, e in zip(filepaths, emb) if e is None] == [p for p, _ in report.failed] == \
        [str(dataset.last().filepath)]
    good = [(p, e) for p, e in zip(filepaths, emb) if e is not None]
    want = tiny_model.encode_image([p for p, _ in good]).numpy()
    assert cosine_rows(np.stack([e for _, e in good]), want).min() >= 0.999


@pytest.mark.parametrize("num_workers", [0, 1])
def test_fiftyones_own_loop_skips_the_bad_images_batch_like_any_zoo_model(dataset, zoo_tiny, tiny_model,
                                                                           num_workers, caplog):
    """FiftyOne's compute_embeddings, DataLoader and all: an unreadable image fails its batch (FiftyOne's
    skip_failures, the same for every zoo model), every other batch is embedded like the core does; no
    guess at which FiftyOne loop called."""
    model = foz.load_zoo_model(zoo_tiny, cache=False)
    dataset.compute_embeddings(model, embeddings_field="emb", batch_size=4, num_workers=num_workers)
    emb = dataset.values("emb")
    assert [e is None for e in emb] == [False] * 4 + [True] * 4, "the corrupt image is the last one"
    assert "Batch:" in caplog.text  # FiftyOne's own warning names the skipped batch
    want = tiny_model.encode_image(dataset.values("filepath")[:4]).numpy()
    assert cosine_rows(np.stack(emb[:4]), want).min() >= 0.999
    with pytest.raises(OSError, match="corrupt.jpg"):  # and FiftyOne raises when told not to skip
        dataset.compute_embeddings(model, embeddings_field="emb2", batch_size=4, num_workers=num_workers,
                                   skip_failures=False)


def test_dinov2_field_records_provenance_and_reruns_are_incremental(dataset, zoo_tiny, tiny_model):
    report = fod.compute_embeddings(dataset, zoo_tiny, "emb", dinov2_field="dino")
    info = dataset.get_field("dino").info["dinov2clip"]
    assert info["space"] == "dinov2" and info["pooling"] == "mean" and info["model"] == zoo_tiny
    ok = dataset.exists("dino")
    _, raw = tiny_model.encode_image(ok.values("filepath"), return_dinov2=True)
    assert cosine_rows(np.stack(ok.values("dino")), raw.numpy()).min() >= 0.999
    again = fod.compute_embeddings(dataset, zoo_tiny, "emb", dinov2_field="dino")
    assert (again.embedded, again.skipped_existing, len(again.failed)) == (0, 7, 1)
    new = dataset.first().filepath
    dataset.add_sample(fo.Sample(filepath=new))
    assert fod.compute_embeddings(dataset, zoo_tiny, "emb", dinov2_field="dino").embedded == 1
    assert report.embedded == 7


def test_projecting_a_stored_field_checks_its_provenance(dataset, zoo_tiny):
    fod.compute_embeddings(dataset, zoo_tiny, "emb", dinov2_field="dino")
    assert fod.project_field(dataset, "dino", zoo_tiny, "projected") == 7
    a, b = np.stack(dataset.exists("emb").values("emb")), np.stack(dataset.exists("projected").values("projected"))
    np.testing.assert_allclose(a, b, atol=1e-5)
    # a CLS-token field of unknown origin (what most users have) is refused, with the reason
    dataset.set_values("cls", [np.ones(48, np.float32)] * len(dataset))
    with pytest.raises(UserError, match="CLS tokens"):
        fod.project_field(dataset, "cls", zoo_tiny, "p2")
    with pytest.raises(UserError, match="cls-pooled"):
        fod.project_field(dataset, "cls", zoo_tiny, "p2", provenance={"source": "x", "pooling": "cls"})
    # and one field never mixes two embedding spaces
    with pytest.raises(UserError, match="dinov2 embeddings"):
        fod.compute_embeddings(dataset, zoo_tiny, "dino")


def test_new_process_sorts_by_text_like_the_cosine_ranking(dataset, zoo_tiny):
    """The index records the model's zoo name; a fresh process reloads the model by that name and ranks the
    stored embeddings exactly as cosine to embed_prompt does."""
    dataset.persistent = True
    results, report = fod.compute_similarity(dataset, zoo_tiny, brain_key="txt", dinov2_field="dino",
                                             dinov2_brain_key="img")
    assert dataset.get_brain_info("txt").config.model == zoo_tiny
    assert dataset.get_brain_info("txt").config.supports_prompts
    script = textwrap.dedent(f"""
        import json, numpy as np, fiftyone as fo, fiftyone.zoo as foz
        ds = fo.load_dataset({dataset.name!r})
        q = foz.load_zoo_model({zoo_tiny!r}).embed_prompt("a red circle")
        ids, emb = ds.exists("dinov2clip").values(["id", "dinov2clip"])
        cos = np.stack(emb) @ q
        print(json.dumps({{"sorted": ds.sort_by_similarity("a red circle", brain_key="txt").values("id"),
                          "cosine": [ids[i] for i in np.argsort(-cos, kind="stable")],
                          "gap": float(np.min(np.abs(np.diff(np.sort(cos)))))}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["gap"] > 1e-6, "ties would make the order ambiguous"
    assert got["sorted"] == got["cosine"] and len(got["sorted"]) == 7
    # the image-only DINOv2 index answers image queries and refuses text, saying how to fix it
    first = dataset.exists("dino").first().id
    assert dataset.sort_by_similarity(first, brain_key="img", k=1).first().id == first
    with pytest.raises(UserError, match="recompute"):
        fod.sort_by_text(dataset, "a red circle", brain_key="img")


def test_lancedb_backend(dataset, zoo_tiny, tmp_path):
    """lancedb (offline), with the user's own table name: the text index takes it, the DINOv2 index of the
    same call gets its own table, and both answer."""
    pytest.importorskip("lancedb")
    fod.compute_similarity(dataset, zoo_tiny, brain_key="lance", backend="lancedb", uri=str(tmp_path / "lance"),
                           table_name="mine", dinov2_field="dino", dinov2_brain_key="lance_dino")
    tables = {k: dataset.get_brain_info(k).config.table_name for k in ("lance", "lance_dino")}
    assert tables["lance"] == "mine" and tables["lance_dino"] != "mine", tables
    q = foz.load_zoo_model(zoo_tiny).embed_prompt("a blue square")
    ids, emb = dataset.exists("dinov2clip").values(["id", "dinov2clip"])
    best = ids[int(np.argmax(np.stack(emb) @ q))]
    assert fod.sort_by_text(dataset, "a blue square", brain_key="lance", k=3).first().id == best
    assert dataset.sort_by_similarity(ids[0], brain_key="lance_dino", k=1).first().id == ids[0]


def test_patches_field(tmp_path, zoo_tiny, tiny_model):
    paths = make_images(tmp_path / "images")[:3]
    ds = fo.Dataset()
    for p in paths:
        ds.add_sample(fo.Sample(filepath=str(p), gt=fo.Detections(detections=[
            fo.Detection(label="a", bounding_box=[0.1, 0.1, 0.5, 0.5]),
            fo.Detection(label="b", bounding_box=[0.4, 0.3, 0.5, 0.6])])))
    results, _ = fod.compute_similarity(ds, zoo_tiny, brain_key="patches", patches_field="gt",
                                        embeddings_field="patch_emb")
    assert results.total_index_size == 6
    patches = ds.to_patches("gt")
    view = fod.sort_by_text(patches, "a red circle", brain_key="patches", k=2)
    assert len(view) == 2
    ds.delete()


def test_frames_view(tmp_path, zoo_tiny, tiny_model):
    """Frames of a video dataset (frames already extracted as images) are samples like any other."""
    frames = make_images(tmp_path / "frames")[:4]
    video = fo.Dataset()
    sample = fo.Sample(filepath=str(tmp_path / "clip.mp4"))
    for i, p in enumerate(frames, start=1):
        sample.frames[i] = fo.Frame(filepath=str(p))
    video.add_sample(sample)
    view = video.to_frames(sample_frames=False)
    report = fod.compute_embeddings(view, zoo_tiny, "emb")
    assert report.embedded == 4
    want = tiny_model.encode_image([str(p) for p in frames]).numpy()
    assert cosine_rows(np.stack(view.values("emb")), want).min() >= 0.999
    video.delete()


def test_zero_shot_classification(dataset, zoo_tiny, tiny_model):
    classes = ["red", "green", "blue"]
    model = foz.load_zoo_model(zoo_tiny, cache=False, classes=classes)
    dataset.apply_model(model, label_field="zs", batch_size=4, num_workers=1)
    labels = dataset.values("zs")
    assert [lbl is None for lbl in labels] == [False] * 4 + [True] * 4  # the corrupt image's batch: skipped
    text = tiny_model.encode_text([f"a photo of {c}" for c in classes])
    img = tiny_model.encode_image(dataset.values("filepath")[:4])
    want = [classes[i] for i in (img @ text.T).argmax(1).tolist()]
    assert [lbl.label for lbl in labels[:4]] == want


def test_a_registered_name_stays_bound_to_its_model(tmp_path, zoo_tiny):
    a = dinov2clip.make_tiny(str(tmp_path / "a"), seed=3)
    assert registry.register("reg-test", str(a)) == "reg-test"
    assert registry.register("reg-test", str(a)) == "reg-test"  # same weights: a no-op
    dinov2clip.make_tiny(str(tmp_path / "a"), seed=4, overwrite=True)  # new weights, same directory
    stale = foz.load_zoo_model("reg-test", cache=False)
    with pytest.raises(UserError, match="changed since it was registered"):
        stale.embed_prompt("x")
    with pytest.raises(UserError, match=r"'reg-test' already names another model .*unregister it first"):
        registry.register("reg-test", str(a))
    b = dinov2clip.make_tiny(str(tmp_path / "b"), seed=5)
    with pytest.raises(UserError, match="already names another model"):
        registry.register("reg-test", str(b))
    with pytest.raises(UserError, match="already names a registered model"):
        registry.check_name("reg-test", free=True)  # what fit checks before it starts
    assert registry.unregister("reg-test") == ["reg-test"]
    assert registry.register("reg-test", str(a)) == "reg-test"  # free again
    assert foz.load_zoo_model("reg-test", cache=False).embed_prompt("x").shape == (32,)
    registry.unregister("reg-test")


def test_entries_an_older_release_versioned_still_load_and_unregister(zoo_tiny, tiny_dir):
    """A registry written with `name@N` entries (earlier releases) keeps loading them by that name."""
    manifest = registry.read_manifest()
    entry = {**manifest["models"][0], "base_name": "old-style", "base_filename": "old-style.json", "version": "2"}
    (registry.source_dir() / "old-style-v2.json").write_text(json.dumps(
        {"zoo_name": "old-style@2", **{k: v for k, v in registry.spec(zoo_tiny).items() if k != "zoo_name"}}))
    (registry.source_dir() / "manifest.json").write_text(json.dumps({**manifest, "models": [*manifest["models"], entry]}))
    assert "old-style@2" in registry.registered() and registry.resolve("old-style@2") == "old-style@2"
    assert foz.load_zoo_model("old-style@2", cache=False).embed_prompt("x").shape == (32,)
    # its base name stays bound to that model: the same one again is that entry, another one is refused
    assert registry.register("old-style", str(tiny_dir)) == "old-style@2"
    with pytest.raises(UserError, match="'old-style' already names another model"):
        registry.register("old-style", "reference")
    with pytest.raises(UserError, match="'old-style' already names a registered model"):
        registry.check_name("old-style", free=True)
    assert registry.unregister("old-style") == ["old-style@2"]
    # an edited entry cannot point the registry at a file outside its folder
    outside = registry.source_dir().parent / "escape.json"
    outside.write_text("{}")
    edited = {**entry, "base_name": "../escape", "version": None}
    (registry.source_dir() / "manifest.json").write_text(json.dumps({**manifest, "models": [*manifest["models"], edited]}))
    with pytest.raises(UserError, match="outside its folder"):
        registry.unregister("../escape")
    assert outside.read_text() == "{}"
    (registry.source_dir() / "manifest.json").write_text(json.dumps(manifest))
    outside.unlink()
    assert not (registry.source_dir() / "old-style-v2.json").exists()


def test_registry_errors(tmp_path, zoo_tiny):
    with pytest.raises(UserError, match=r"unknown dinov2clip zoo model 'nope'.*dinov2clip-test-tiny"):
        fod.load("nope")
    with pytest.raises(UserError, match="model directory not found"):
        registry.register("x-missing", str(tmp_path / "absent"))
    with pytest.raises(UserError, match="FiftyOne already lists"):
        registry.register("clip-vit-base32-torch", "reference")
    # a model another registered source provides (laid out as FiftyOne leaves a downloaded source) is taken too
    import shutil

    other = Path(fo.config.model_zoo_dir) / "someone-else"
    other.mkdir(parents=True)
    try:
        (other / "manifest.json").write_text(json.dumps({"name": "someone/else", "url": "https://example.com/src",
                                                         "models": [{"base_name": "their-model", "version": None,
                                                                     "base_filename": "x", "tags": []}]}))
        with pytest.raises(UserError, match="FiftyOne already lists"):
            registry.register("their-model", "reference")
    finally:
        shutil.rmtree(other)
    gone = dinov2clip.make_tiny(str(tmp_path / "gone"), seed=5)
    name = registry.register("reg-gone", str(gone))
    shutil.rmtree(gone)
    with pytest.raises(UserError, match=r"reg-gone: its model directory .* is missing.*registered: .*reg-gone"):
        foz.load_zoo_model(name, cache=False)
    registry.unregister("reg-gone")
    with pytest.raises(UserError, match="invalid zoo model name"):
        registry.register("a.b", "reference")


def test_presets_register_with_license_tags_and_real_files(zoo_tiny):
    names = registry.register_presets()
    assert names == ["dinov2clip-reference"]
    zoo_model = foz.get_zoo_model(names[0])
    assert {"embeddings", "text-embeddings", "zero-shot"} <= set(zoo_model.tags)
    assert zoo_model.license and "licence" in zoo_model.license
    assert os.path.isfile(zoo_model.get_path_in_dir(fo.config.model_zoo_dir))
    assert names[0] in foz.list_zoo_models()


def test_fiftyones_own_compute_similarity_survives_an_unreadable_image(dataset, zoo_tiny, caplog):
    """The path FiftyOne's docs and the App's Brain operator take: `fob.compute_similarity(model=NAME)`, no
    embeddings field, which np.stack()s the results. It completes: the corrupt image's batch is left out (what
    FiftyOne's own skip_failures costs on this path), the file is named, every other batch is indexed and
    searchable by text. (`fod.compute_similarity` loses only the bad sample: see the parity test.)"""
    import fiftyone.brain as fob

    ids = dataset.values("id")
    bad = dataset.match(fo.ViewField("filepath").ends_with("corrupt.jpg")).first().id
    results = fob.compute_similarity(dataset, model=zoo_tiny, brain_key="stock", batch_size=4)
    assert "stock" in dataset.list_brain_runs()
    bad_batch = ids.index(bad) // 4
    kept = set(ids[:4 * bad_batch] + ids[4 * bad_batch + 4:])
    assert set(results.sample_ids) == kept and kept, results.sample_ids
    assert "corrupt.jpg" in caplog.text
    assert len(dataset.sort_by_similarity("a red circle", brain_key="stock", k=3)) == 3


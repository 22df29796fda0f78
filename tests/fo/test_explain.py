"""Why did this match? `fiftyone_dinov2clip.explain` and the "explain text matches" operator on a real mongod
dataset: `fo.Heatmap` labels for a text query's top k only, each in its image's own coordinates and recording
the query, model and method; unreadable images named; bad input refused in one line, nothing written."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fiftyone.zoo", reason="fiftyone is not installed (pip install '.[fiftyone]')")

from test_plugin import PLUGIN, QUERY, form, plugin, run  # noqa: E402,F401 (plugin: the installed-plugin fixture)

EXPLAIN = f"{PLUGIN}/explain_text_matches"
FIELD = "dinov2clip_heatmap"
TEXT = "a photo of a dog"


def _images(root: Path, n: int = 8) -> list[Path]:
    """`n` random images of different sizes and aspect ratios (wide, tall), PNG and JPEG."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = (40 + 11 * i, 90 - 6 * i) if i % 2 else (70 - 3 * i, 48 + 13 * i)
        path = root / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _indexed(name_root: Path, zoo_tiny, n: int = 8):
    import fiftyone as fo

    from fiftyone_dinov2clip import brain

    dataset = fo.Dataset()
    dataset.add_samples([fo.Sample(filepath=str(p)) for p in _images(name_root, n)])
    brain.compute_similarity(dataset, zoo_tiny)
    return dataset


@pytest.fixture(scope="module")
def indexed(zoo_tiny, tmp_path_factory):
    dataset = _indexed(tmp_path_factory.mktemp("explain-images"), zoo_tiny)
    yield dataset
    dataset.delete()


@pytest.fixture
def fresh(indexed):
    """The module's dataset with no heatmap field (each test writes its own)."""
    yield indexed
    for f in [FIELD, "maps"]:
        if indexed.get_field(f) is not None:
            indexed.delete_sample_field(f)


def _last_modified(dataset) -> dict:
    return dict(zip(*dataset.values(["id", "last_modified_at"])))


@pytest.mark.parametrize("method", [None, "gradient"])
def test_explain_writes_heatmaps_for_the_top_k_only(fresh, zoo_tiny, method):
    import fiftyone as fo
    import fiftyone.zoo as foz

    from dinov2clip.heatmap import DEFAULT_METHOD
    from fiftyone_dinov2clip import brain, explain

    dataset = fresh
    top = brain.sort_by_text(dataset, TEXT, k=3).values("id")
    before = _last_modified(dataset)
    report = explain(dataset, TEXT, k=3, **({"method": method} if method else {}))
    assert (report.hits, report.explained, report.failed, report.query_cut) == (top, top, [], False)
    assert str(report) == "wrote 3 heatmaps, 0 unreadable images (no heatmap)"

    after = _last_modified(dataset)
    assert {i for i in after if after[i] != before[i]} == set(top)  # only the k hits touched
    labelled = dict(zip(*dataset.values(["id", FIELD])))
    assert {i for i, label in labelled.items() if label is not None} == set(top)
    assert dataset.get_field(FIELD).document_type is fo.Heatmap

    core = foz.load_zoo_model(zoo_tiny).core(image=True, text=True)
    for sample in dataset.select(top):
        label = sample[FIELD]
        with Image.open(sample.filepath) as img:
            size = (img.height, img.width)
        assert label.map.dtype == np.float32 and label.map.shape == size
        assert label.map.flags["C_CONTIGUOUS"]  # the App's numpy reader takes no Fortran-order array
        assert label.range == [0, 1] and label.map.min() >= 0 and label.map.max() == pytest.approx(1)
        assert (label.query, label.model, label.method) == (TEXT, zoo_tiny, method or DEFAULT_METHOD)
        (expected,) = core.heatmap([sample.filepath], TEXT, method=method or DEFAULT_METHOD)
        np.testing.assert_allclose(label.map, expected, atol=1e-5)  # the core's map, stored as it is


def test_explain_again_replaces_its_own_maps_and_max_side_bounds_them(fresh):
    from fiftyone_dinov2clip import explain

    explain(fresh, TEXT, k=2)
    report = explain(fresh, "a red car", k=2, max_side=32)  # a field explain wrote: it writes there again
    for sample in fresh.select(report.explained):
        label = sample[FIELD]
        with Image.open(sample.filepath) as img:
            w, h = img.size
        assert max(label.map.shape) == 32 and label.query == "a red car"
        assert abs(label.map.shape[0] / label.map.shape[1] - h / w) < 0.1  # the image's aspect ratio


def test_unreadable_hit_is_named_and_gets_no_label(zoo_tiny, tmp_path):
    from fiftyone_dinov2clip import brain, explain

    dataset = _indexed(tmp_path / "images", zoo_tiny, n=4)
    try:
        top = brain.sort_by_text(dataset, TEXT, k=2)
        broken = top.first().filepath
        Path(broken).write_bytes(b"\xff\xd8\xff\xe0 truncated after indexing")
        report = explain(dataset, TEXT, k=2)
        assert [p for p, _ in report.failed] == [broken]
        assert report.written == 1 and report.explained == top.values("id")[1:]
        assert "unreadable" in str(report)
        labels = dict(zip(*dataset.values(["filepath", FIELD])))
        assert labels[broken] is None and sum(v is not None for v in labels.values()) == 1
    finally:
        dataset.delete()


def test_a_query_past_what_the_text_tower_reads_is_explained_and_says_so(fresh):
    from fiftyone_dinov2clip import explain

    long = ("a photo of a dog on a beach " * 400)[:10_000]
    report = explain(fresh, long, k=1)
    assert report.query_cut and report.written == 1
    assert fresh[report.explained[0]][FIELD].query == long


@pytest.mark.parametrize("kwargs, message", [
    ({"text": ""}, "a text query must be a non-empty string, not ''"),
    ({"text": "   \n"}, "a text query must be a non-empty string"),
    ({"text": None}, "a text query must be a non-empty string, not None"),
    ({"k": 0}, "k must be a whole number, at least 1, not 0"),
    ({"k": None}, "k must be a whole number, at least 1"),
    ({"k": True}, "k must be a whole number, at least 1"),
    ({"max_side": 0}, "max_side must be a whole number, at least 1, or None"),
    ({"method": "nope"}, "unknown heatmap method 'nope': choose one of"),
    ({"brain_key": "missing"}, "dataset '{dataset}' has no brain run 'missing'; compute one"),
    ({"label_field": "dinov2clip"}, "field 'dinov2clip' exists and does not hold dinov2clip heatmaps"),
    ({"label_field": "filepath"}, "field 'filepath' exists and does not hold dinov2clip heatmaps"),
    ({"label_field": "a.b"}, "label field 'a.b': give a top-level field name"),
])
def test_bad_input_is_one_line_and_writes_nothing(fresh, kwargs, message):
    from dinov2clip.errors import UserError
    from fiftyone_dinov2clip import explain

    before = _last_modified(fresh)
    with pytest.raises(UserError) as e:
        explain(fresh, **{"text": TEXT, "k": 2, **kwargs})
    assert str(e.value).startswith(message.format(dataset=fresh.name)) and "\n" not in str(e.value)
    assert fresh.get_field(FIELD) is None and _last_modified(fresh) == before


def test_a_dataset_without_the_brain_run_is_one_line(tmp_path):
    import fiftyone as fo

    from dinov2clip.errors import UserError
    from fiftyone_dinov2clip import explain

    dataset = fo.Dataset()
    try:
        dataset.add_samples([fo.Sample(filepath=str(p)) for p in _images(tmp_path, 2)])
        with pytest.raises(UserError, match=r"^dataset '.*' has no brain run 'dinov2clip'; compute one with "):
            explain(dataset, TEXT)
        assert dataset.get_field(FIELD) is None
    finally:
        dataset.delete()


# -- the operator, as the App server runs it ---------------------------------------------------------------
def test_operator_prefills_the_last_text_query_and_explains_the_searched_view(plugin, fresh):
    import asyncio
    import json

    import fiftyone.server.view as fosv
    from bson import json_util
    from fiftyone.operators.executor import execute_or_delegate_operator

    from fiftyone_dinov2clip import brain

    dataset = fresh
    sorted_view = run(QUERY, dataset, brain_key="dinov2clip", query="a red circle", k=3)
    assert sorted_view.error is None, sorted_view.error
    props = form(EXPLAIN, dataset)
    assert props["query"]["default"] == "a red circle" and props["k"]["default"] == 25
    assert props["brain_key"]["default"] == "dinov2clip" and props["label_field"]["default"] == FIELD
    # a query typed in the App's own search box (its view ends in that sort) is offered before ours
    magnifier = dataset.sort_by_similarity("a green square", k=5, brain_key="dinov2clip")
    assert form(EXPLAIN, dataset, view=magnifier)["query"]["default"] == "a green square"
    assert form(EXPLAIN, dataset, view=dataset.limit(3))["query"]["default"] == "a red circle"

    # the App's current view is the text query's top 3: explain searches what it was sorted from
    shown = fosv.get_view(dataset.name, stages=json_util.loads(
        json.dumps(sorted_view.executor.to_json()["requests"][0]["params"]["view"])))
    assert form(EXPLAIN, dataset, view=shown)["query"]["default"] == "a red circle"  # ours sorts by a vector
    before = _last_modified(dataset)
    request = {"dataset_name": dataset.name, "view": shown._serialize(), "active_fields": ["color", FIELD],
               "params": {"query": "a red circle", "k": 4}}  # as the App sends it, with its active fields
    result = asyncio.run(execute_or_delegate_operator(EXPLAIN, request))
    assert result.error is None, result.error
    top = brain.sort_by_text(dataset, "a red circle", k=4).values("id")
    assert result.result == {"written": 4, "unreadable": [], "query_cut": False}
    after = _last_modified(dataset)
    assert {i for i in after if after[i] != before[i]} == set(top)
    requests = result.executor.to_json()["requests"]
    assert [r["operator_uri"] for r in requests] == ["reload_dataset", "set_view", "set_active_fields"]
    view = fosv.get_view(dataset.name, stages=json_util.loads(json.dumps(requests[1]["params"]["view"])))
    assert view.values("id") == top  # the hits, best first
    assert requests[2]["params"]["fields"] == ["color", FIELD]  # the heatmaps shown, nothing hidden

    # from there, another query explains the searched view again, not only those 4
    again = run(EXPLAIN, dataset, view=view, query="a blue square", k=6)
    assert again.error is None and again.result["written"] == 6, again.error
    assert dataset.exists(FIELD).count() == len(set(top) | set(brain.sort_by_text(dataset, "a blue square", k=6)
                                                                 .values("id")))


@pytest.mark.parametrize("params, message", [
    ({"query": ""}, "a text query must be a non-empty string"),
    ({"query": "a dog", "k": 0}, "k must be a whole number, at least 1, not 0"),
    ({"query": "a dog", "k": "many"}, "k must be a whole number, at least 1, not 'many'"),
    ({"query": "a dog", "brain_key": "missing"}, "dataset '{dataset}' has no brain run 'missing'"),
    ({"query": "a dog", "label_field": "filepath"}, "field 'filepath' exists and does not hold dinov2clip heatmaps"),
])
def test_operator_input_errors_are_the_run_error_message(plugin, fresh, params, message):
    result = run(EXPLAIN, fresh, **params)
    assert result.error_message.startswith(message.format(dataset=fresh.name)), result.error_message
    assert "\n" not in result.error_message
    assert fresh.get_field(FIELD) is None


def test_operator_registered(plugin):
    import fiftyone.operators as foo

    registry = foo.OperatorRegistry()
    assert [e for e in registry.list_errors() if "dinov2clip" in e] == []
    assert EXPLAIN in {op.uri for op in registry.list_operators(builtin=False)}


# -- in Chromium: the App shows the heatmap over the top hit -----------------------------------------------
from test_app_browser import COLORS, _artifacts_dir, _unavailable, app_server, dataset, driver  # noqa: E402,F401


@pytest.fixture
def browser_ready():
    """Before the App server and Chromium start: skip (fail in CI) where they cannot run."""
    from support.devapp import browser_missing

    missing = browser_missing()
    if missing:
        _unavailable(missing)


def _image_mask(pixels: np.ndarray, rgb) -> np.ndarray:
    return np.abs(pixels - np.array(rgb)).sum(axis=-1) < 60


def test_app_shows_the_heatmap_over_the_top_hit(browser_ready, dataset, app_server, driver, tmp_path):
    """In the App: sort by text, then "explain text matches" (its form offers that query) → Execute; the grid
    shows the hits best first; the top one opened in the modal is Python's top hit, its heatmap field is listed
    and shown, and the canvas differs where the map is drawn from the same canvas with the field hidden.
    Screenshot (heatmap shown): $DINOV2CLIP_TEST_ARTIFACTS/app-explain-heatmap.png."""
    import time

    from selenium.webdriver.common.by import By

    from fiftyone_dinov2clip import brain
    from support.devapp import Browser

    query = "a red circle"
    top = brain.sort_by_text(dataset, query, k=25).values("id")
    color = dict(zip(*dataset.values(["id", "color"])))[top[0]]
    b = Browser(driver, app_server, _artifacts_dir(tmp_path) / "app-explain-heatmap.png")
    shot = False
    try:
        b.open_dataset(dataset.name)
        b.open_operator("sort by text")
        b.form_input("Text query").send_keys(query)
        b.execute_operator("Results")
        b.open_operator("explain text matches")
        assert b.form_input("Text query").get_attribute("value") == query, b.context()  # prefilled
        out = b.execute_operator("Heatmaps written")
        assert f"Heatmaps written:\n{len(top)}\n" in out, out + b.context()

        # the App applies the run's reload, view and active fields after its output shows: a sample opened before
        # the reload lands would not know the new field (a person closing the output is slower than that)
        b.wait_for("the grid's sidebar to show the heatmap field", lambda d: any(
            e.is_selected() for e in d.find_elements(By.CSS_SELECTOR, f'[data-cy="checkbox-{FIELD}"] input')), 30)
        assert b.open_first_tile() == top[0], b.context()
        checkbox = b.modal_field_checkbox(FIELD)
        assert checkbox.find_element(By.TAG_NAME, "input").is_selected(), "the heatmap field is not shown"

        def settled(_):  # the overlay is drawn after the image: wait for two equal captures
            first = b.modal_pixels()
            time.sleep(0.3)
            second = b.modal_pixels()
            return [second] if first.shape == second.shape and (first == second).all() else False

        def without_heatmap(_):  # the image alone: most of it its own solid colour again
            p = b.modal_pixels()
            return [p] if p.shape == shown.shape and (p != shown).any() and \
                _image_mask(p, COLORS[color]).mean() > 0.2 else False

        (shown,) = b.wait_for("the modal's canvas to settle", settled, 20)
        b.screenshot()
        shot = True
        checkbox.click()  # hide the heatmap field
        (hidden,) = b.wait_for("the modal's canvas without the heatmap", without_heatmap, 20)
        image = _image_mask(hidden, COLORS[color])  # the solid-colour image, as the App draws it alone
        changed = np.abs(shown - hidden).sum(axis=-1) > 30
        print(f"image pixels {image.sum()}, of which the heatmap changes {changed[image].mean():.1%}; "
              f"outside the image {changed[~image].mean():.1%}")
        assert changed[image].mean() > 0.25, f"the heatmap is not drawn over the image; screenshot {b.shot}"
        assert changed[~image].mean() < 0.05, f"something besides the heatmap changed; screenshot {b.shot}"
    finally:
        if not shot:
            try:
                print(f"screenshot: {b.screenshot()}")
            except Exception as e:  # never hide the test's own failure
                print(f"could not save a screenshot: {e}")

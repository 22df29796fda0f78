"""The FiftyOne App's natural-language search, in a real browser, over a registered dinov2clip model.

A fresh persistent dataset of solid-colour images gets a dinov2clip similarity index. A fresh App
server (`python -m fiftyone.server.main`) — which must reload the model by its zoo name, from the
isolated zoo directory it sees through FIFTYONE_MODEL_ZOO_DIR — serves it to headless Debian chromium
driven by Selenium: magnifier → query → Enter → the Similarity Search panel's run completes → "Show
results". The first sample of the re-sorted grid must be Python's top-1 for the same query. It is read
two independent ways: the grid's `paginateSamplesQuery` GraphQL response (browser network log), and
the colour of the top-left tile in a screenshot (every image is one distinct solid colour).

The tiny model has random weights: the ranking is arbitrary but deterministic, and the App must agree
with Python. A screenshot is always saved (to $DINOV2CLIP_TEST_ARTIFACTS, else tmp_path); a failure
carries the browser console log and the App server's log tail.

Skips without chromium / chromedriver / selenium, except under DINOV2CLIP_REQUIRE_FIFTYONE=1 (CI)."""
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.devapp import AppServer, Browser, browser_missing, chromium, install_plugin

BRAIN_KEY = "dinov2clip"
# Distinct, saturated colours: far apart in RGB, and none close to the App's dark background.
COLORS = {
    "red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 60, 220), "yellow": (235, 225, 40),
    "magenta": (210, 40, 200), "cyan": (40, 200, 210), "orange": (245, 140, 20), "white": (245, 245, 245),
}
QUERIES = ["a red circle", "a photo of a dog", "a blue square", "a green tree", "a yellow banana",
           "a cat on a sofa", "the night sky", "a white wall"]
MIN_GAP = 1e-3

REQUIRED = os.environ.get("DINOV2CLIP_REQUIRE_FIFTYONE") == "1"


def _unavailable(reason: str):  # as in conftest: a skip here, a failure in CI
    if REQUIRED:
        pytest.fail(f"DINOV2CLIP_REQUIRE_FIFTYONE=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _require_browser():
    """Before any expensive setup: skip (fail in CI) without selenium, chromium or chromedriver."""
    missing = browser_missing()
    if missing:
        _unavailable(missing)


def _artifacts_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("DINOV2CLIP_TEST_ARTIFACTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _pick_query(dataset, model):
    """The first query whose top-1 is clear (top-2 cosine gap > MIN_GAP) and is not the grid's default
    first sample (so the App's re-sort is visible); → (query, expected id, ranked (cos, id) list)."""
    ids = dataset.values("id")
    emb = np.stack(dataset.values(BRAIN_KEY)).astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    tried = []
    for q in QUERIES:
        t = np.asarray(model.embed_prompt(q), np.float64)
        cos = emb @ (t / np.linalg.norm(t))
        order = np.argsort(-cos)
        gap = cos[order[0]] - cos[order[1]]
        tried.append(f"{q!r}: gap {gap:.2e}, top {ids[order[0]]}")
        if gap > MIN_GAP and order[0] != 0:
            return q, ids[order[0]], [(float(cos[i]), ids[i]) for i in order]
    pytest.fail("no candidate query has a clear top-1 that is not the first sample: " + "; ".join(tried))


@pytest.fixture
def dataset(tmp_path, zoo_tiny):
    import fiftyone as fo

    import fiftyone_dinov2clip

    name = f"dinov2clip-app-{uuid.uuid4().hex[:10]}"
    ds = fo.Dataset(name, persistent=True)
    try:
        samples = []
        for label, rgb in COLORS.items():
            path = tmp_path / "images" / f"{label}.png"
            path.parent.mkdir(exist_ok=True)
            Image.new("RGB", (64, 64), rgb).save(path)
            samples.append(fo.Sample(filepath=str(path), color=label))
        ds.add_samples(samples)
        fiftyone_dinov2clip.compute_similarity(ds, zoo_tiny, brain_key=BRAIN_KEY)
        yield ds
    finally:
        fo.delete_dataset(name)


@pytest.fixture
def app_server(dataset, tmp_path):
    # the plugin as a user installs it, in this server's own plugins folder
    plugins = install_plugin(tmp_path / "plugins").parent
    server = AppServer(tmp_path / "app-server.log", env={"FIFTYONE_PLUGINS_DIR": str(plugins)})
    try:
        yield server.wait()
    finally:
        server.stop()


@pytest.fixture
def driver(tmp_path):
    drv = chromium(tmp_path / "chromium-profile", tmp_path / "chromedriver.log")
    try:
        yield drv
    finally:
        drv.quit()


def _nearest_color(rgb) -> tuple[str, float]:
    name = min(COLORS, key=lambda c: np.linalg.norm(np.subtract(COLORS[c], rgb)))
    return name, float(np.linalg.norm(np.subtract(COLORS[name], rgb)))


def _ranking_violations(app_order, cos_of, tol=1e-4) -> list[str]:
    """Adjacent pairs of the App's order that Python ranks the other way round (beyond float noise)."""
    return [f"{a} ({cos_of[a]:.5f}) before {b} ({cos_of[b]:.5f})"
            for a, b in zip(app_order, app_order[1:]) if cos_of[a] < cos_of[b] - tol]


def test_app_text_search_matches_python(dataset, app_server, driver, zoo_tiny, tmp_path):
    import fiftyone.zoo as foz

    started = time.time()
    # What the App server will do: reload the model by the zoo name recorded in the index.
    assert dataset.get_brain_info(BRAIN_KEY).config.model == zoo_tiny
    model = foz.load_zoo_model(zoo_tiny)
    query, expected, ranked = _pick_query(dataset, model)
    assert dataset.sort_by_similarity(query, brain_key=BRAIN_KEY).first().id == expected
    cos_of = {i: c for c, i in ranked}
    color_of = dict(zip(dataset.values("id"), dataset.values("color")))
    first_default = dataset.first().id
    want = color_of[expected]
    print(f"query {query!r}: Python's top-1 {expected} ({want}); ranking: "
          + ", ".join(f"{color_of[i]} {c:.4f}" for c, i in ranked))

    b = Browser(driver, app_server, _artifacts_dir(tmp_path) / "app-text-search.png")
    shot = b.shot
    try:
        b.open_dataset(dataset.name)
        # The pixel reading works: the unsorted grid starts with the dataset's first image.
        b.wait_for(f"the unsorted grid's first tile to show {color_of[first_default]}",
                   lambda _: _nearest_color(b.first_tile_rgb())[0] == color_of[first_default], 15)
        b.search(query, timeout=45)
        app_order, _ = b.show_results(timeout=20)
        # Tiles repaint asynchronously after the new page arrives: poll the top-left one for a while.
        deadline = time.time() + 15
        while True:
            rgb = b.first_tile_rgb()
            seen, dist = _nearest_color(rgb)
            if (seen == want and dist < 40) or time.time() > deadline:
                break
            time.sleep(0.2)

        msg = (f"query {query!r}: Python's top-1 is {expected} ({want}); the App's grid order is "
               f"{[color_of.get(i, i) for i in app_order]} ({app_order}); its first tile's colour is {rgb} "
               f"≈ {seen} (distance {dist:.0f}); screenshot {shot}")
        assert app_order and app_order[0] == expected, msg + b.context()
        assert seen == want and dist < 40, msg + b.context()
        assert sorted(app_order) == sorted(cos_of), msg + " — the App did not return every sample" + b.context()
        bad = _ranking_violations(app_order, cos_of)
        assert not bad, msg + " — out of Python's order: " + "; ".join(bad) + b.context()
        print(f"the App agrees with Python: first {expected} ({want}), order "
              f"{[color_of[i] for i in app_order]}; {time.time() - started:.1f} s")
    finally:
        try:
            print(f"screenshot: {b.screenshot()}")
        except Exception as e:  # never hide the test's own failure
            print(f"could not save a screenshot: {e}")

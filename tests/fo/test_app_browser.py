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
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fiftyone_dinov2clip.devdb import free_port, stop_process

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
BRAIN_KEY = "dinov2clip"
# Distinct, saturated colours: far apart in RGB, and none close to the App's dark background.
COLORS = {
    "red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 60, 220), "yellow": (235, 225, 40),
    "magenta": (210, 40, 200), "cyan": (40, 200, 210), "orange": (245, 140, 20), "white": (245, 245, 245),
}
QUERIES = ["a red circle", "a photo of a dog", "a blue square", "a green tree", "a yellow banana",
           "a cat on a sofa", "the night sky", "a white wall"]
MIN_GAP = 1e-3

# Selectors (see shared/notes/fiftyone-app.md), FiftyOne 1.22.1.
GRID_READY = '[data-cy="fo-grid"] [data-cy="looker"] canvas[canvas-loaded="true"]'
TILE = '[data-cy="fo-grid"] [data-cy="looker"]'
MAGNIFIER = '[data-cy="action-sort-by-similarity"]'
QUERY_BOX = '[data-cy="popout"] input[data-cy="input-Type anything!"]'
PANEL = '[data-cy="panel-content-similarity_search_panel"]'
RUN_LIST = PANEL + ' .similarity-run-list'
SHOW_RESULTS = 'button[aria-label="Show results"]'
VIEW_STAGE = '[data-cy="view-bar"] [data-cy="view-stage-container"]'

REQUIRED = os.environ.get("DINOV2CLIP_REQUIRE_FIFTYONE") == "1"


def _unavailable(reason: str):  # as in conftest: a skip here, a failure in CI
    if REQUIRED:
        pytest.fail(f"DINOV2CLIP_REQUIRE_FIFTYONE=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _require_browser():
    """Before any expensive setup: skip (fail in CI) without selenium, chromium or chromedriver."""
    if importlib.util.find_spec("selenium") is None:
        _unavailable("selenium is not installed (pip install selenium)")
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not os.access(exe, os.X_OK):
            _unavailable(f"{exe} is missing (apt-get install chromium chromium-driver)")


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


class AppServer:
    def __init__(self, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fiftyone.server.main", "--port", str(self.port), "--address", "127.0.0.1"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the App server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"the App server did not answer HTTP within {timeout} s:\n{self.tail()}")

    def tail(self, n=4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self):
        stop_process(self.proc, timeout=15)
        self._log.close()


@pytest.fixture
def app_server(dataset, tmp_path):
    server = AppServer(tmp_path / "app-server.log")
    try:
        server.wait()
        yield server
    finally:
        server.stop()


@pytest.fixture
def driver(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1920,1080", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                           options=opts)
    try:
        drv.set_page_load_timeout(30)
        yield drv
    finally:
        drv.quit()


class Browser:
    """The driver plus everything a failure message needs: console log, network log, server log."""

    def __init__(self, driver, server: AppServer, artifacts: Path):
        self.d = driver
        self.server = server
        self.artifacts = artifacts
        self.shot = artifacts / "app-text-search.png"  # saved at the end, pass or fail
        self.console: list[str] = []
        self.network: list[dict] = []

    def drain_logs(self):
        for e in self.d.get_log("browser"):
            self.console.append(f"[{e.get('level')}] {e.get('message')}")
        for e in self.d.get_log("performance"):
            self.network.append(json.loads(e["message"])["message"])

    def screenshot(self) -> Path:
        self.d.save_screenshot(str(self.shot))
        print(f"screenshot: {self.shot}")
        return self.shot

    def context(self) -> str:
        try:
            self.drain_logs()
        except Exception as e:  # the browser may be gone
            self.console.append(f"(could not read the browser log: {e})")
        console = "\n".join(self.console[-60:]) or "(empty)"
        return (f"\n--- browser console log ---\n{console}\n--- App server log (tail) ---\n{self.server.tail()}")

    def wait_for(self, what: str, cond, timeout: float):
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.2).until(cond)
        except TimeoutException:
            pytest.fail(f"timed out after {timeout} s waiting for {what}; screenshot {self.shot}{self.context()}")

    def css(self, selector: str, clickable=False, timeout=30):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC

        wanted = EC.element_to_be_clickable if clickable else EC.presence_of_element_located
        return self.wait_for(selector, wanted((By.CSS_SELECTOR, selector)), timeout)

    def graphql_samples(self, after_ts: float) -> list[list[str]] | None:
        """Sample ids of each `paginateSamplesQuery` response for a view with a `Select` stage (what "Show
        results" applies) requested after `after_ts` (a CDP monotonic timestamp), oldest first; None while
        there is none or one is still in flight."""
        self.drain_logs()
        sent = {}
        for m in self.network:
            if m["method"] == "Network.requestWillBeSent" and m["params"]["timestamp"] > after_ts:
                req = m["params"]["request"]
                if "/graphql" in req["url"] and "paginateSamplesQuery" in (req.get("postData") or ""):
                    view = json.loads(req["postData"])["variables"]["view"]
                    if any(st["_cls"] == "fiftyone.core.stages.Select" for st in view):
                        sent[m["params"]["requestId"]] = m["params"]["timestamp"]
        done = {m["params"]["requestId"] for m in self.network
                if m["method"] == "Network.loadingFinished" and m["params"]["requestId"] in sent}
        if not sent or done != set(sent):
            return None
        out = []
        for rid in sorted(sent, key=sent.get):
            body = self.d.execute_cdp_cmd("Network.getResponseBody", {"requestId": rid})["body"]
            edges = json.loads(body)["data"]["samples"]["edges"]
            out.append([_sample_id(e["node"]) for e in edges])
        return out

    def cdp_now(self) -> float:
        """The latest CDP network timestamp seen so far (monotonic seconds)."""
        self.drain_logs()
        return max((m["params"].get("timestamp", 0) for m in self.network if m["method"].startswith("Network.")),
                   default=0.0)

    def first_tile_rgb(self) -> tuple[int, int, int]:
        """Median colour of the central patch of the top-left grid tile, from a screenshot of it."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By

        try:
            tiles = [t for t in self.d.find_elements(By.CSS_SELECTOR, TILE) if t.is_displayed()]
            if not tiles:
                return (-1, -1, -1)
            first = min(tiles, key=lambda t: (round(t.rect["y"]), round(t.rect["x"])))
            png = first.screenshot_as_png
        except WebDriverException:  # a tile replaced while the grid repaints
            return (-1, -1, -1)
        img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        h, w = img.shape[:2]
        patch = img[h * 2 // 5: h * 3 // 5, w * 2 // 5: w * 3 // 5].reshape(-1, 3)
        return tuple(int(v) for v in np.median(patch, axis=0))


def _sample_id(node: dict) -> str:
    sample = node["sample"]
    if isinstance(sample, str):
        sample = json.loads(sample)
    sid = sample.get("_id") or sample.get("id")
    return sid["$oid"] if isinstance(sid, dict) else sid


def _nearest_color(rgb) -> tuple[str, float]:
    name = min(COLORS, key=lambda c: np.linalg.norm(np.subtract(COLORS[c], rgb)))
    return name, float(np.linalg.norm(np.subtract(COLORS[name], rgb)))


def _ranking_violations(app_order, cos_of, tol=1e-4) -> list[str]:
    """Adjacent pairs of the App's order that Python ranks the other way round (beyond float noise)."""
    return [f"{a} ({cos_of[a]:.5f}) before {b} ({cos_of[b]:.5f})"
            for a, b in zip(app_order, app_order[1:]) if cos_of[a] < cos_of[b] - tol]


def test_app_text_search_matches_python(dataset, app_server, driver, zoo_tiny, tmp_path):
    import fiftyone.zoo as foz
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

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

    b = Browser(driver, app_server, _artifacts_dir(tmp_path))
    shot = b.shot
    try:
        # The Enterprise popover's backdrop would intercept clicks: mark it seen before the App loads.
        driver.get(app_server.url + "/favicon.ico")
        driver.execute_script("window.localStorage.setItem('fiftyone-enterprise-tooltip-seen', 'true')")
        driver.get(f"{app_server.url}/datasets/{dataset.name}")
        b.css(GRID_READY, timeout=45)
        # The pixel reading works: the unsorted grid starts with the dataset's first image.
        b.wait_for(f"the unsorted grid's first tile to show {color_of[first_default]}",
                   lambda _: _nearest_color(b.first_tile_rgb())[0] == color_of[first_default], 15)

        b.css(MAGNIFIER, clickable=True).click()
        box = b.css(QUERY_BOX, clickable=True)
        box.send_keys(query)
        box.send_keys(Keys.ENTER)

        def run_finished(_):
            """'ok' once the panel's run offers "Show results"; a reason as soon as anything says it failed
            (a failed run shows nothing on screen: only the console and the server log say why)."""
            if app_server.proc.poll() is not None:
                return "the App server exited"
            if driver.find_elements(By.CSS_SELECTOR, RUN_LIST + " " + SHOW_RESULTS):
                return "ok"
            b.drain_logs()
            failed = [line for line in b.console if "Similarity search failed" in line
                      or "Error executing operator" in line]
            if failed:
                return "failed: " + failed[0][:300]
            panel = driver.find_elements(By.CSS_SELECTOR, PANEL)
            if panel and ("failed" in panel[0].text.lower() or "error" in panel[0].text.lower()):
                return f"failed: the Similarity Search panel says {panel[0].text!r}"
            return False

        state = b.wait_for("the Similarity Search panel's run to complete", run_finished, 45)
        if state != "ok":
            pytest.fail(f"the App's similarity search did not complete ({state}); screenshot {shot}{b.context()}")

        since = b.cdp_now()
        b.css(SHOW_RESULTS, clickable=True).click()
        b.css(VIEW_STAGE, timeout=20)
        app_order = b.wait_for("the re-sorted grid's paginateSamplesQuery response",
                               lambda _: b.graphql_samples(since), 20)[-1]
        b.css(GRID_READY, timeout=20)
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
            b.screenshot()
        except Exception as e:  # never hide the test's own failure
            print(f"could not save a screenshot: {e}")

"""A real FiftyOne App server and headless Debian chromium driving its text search: for this project's
browser test and `benchmarks/bench_app.py`. Not for production use.

Facts this follows (shared notes, FiftyOne 1.22.1): the magnifier's query runs the built-in operator
`@voxel51/panels/similarity_search` and opens a "Similarity Search" panel; the grid re-sorts only after
"Show results"; an Enterprise popover intercepts clicks unless localStorage says it was seen; a failed run
shows nothing on screen (only the console and the server log say why)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .devdb import free_port, stop_process

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SIMILARITY_OPERATOR = "@voxel51/panels/similarity_search"
SIMILARITY_STORE = "similarity_search_panel"  # the execution store the search panel's runs live in
SIMILARITY_NOTIFIER = "@voxel51/panels/get_similarity_search_subscription_notifier"  # its SSE subscription
APP_K = 25  # what the App's search asks for

# Selectors, FiftyOne 1.22.1
GRID_READY = '[data-cy="fo-grid"] [data-cy="looker"] canvas[canvas-loaded="true"]'
TILE = '[data-cy="fo-grid"] [data-cy="looker"]'
MAGNIFIER = '[data-cy="action-sort-by-similarity"]'
QUERY_BOX = '[data-cy="popout"] input[data-cy="input-Type anything!"]'
PANEL = '[data-cy="panel-content-similarity_search_panel"]'
RUN_LIST = PANEL + ' .similarity-run-list'
SHOW_RESULTS = 'button[aria-label="Show results"]'
VIEW_STAGE = '[data-cy="view-bar"] [data-cy="view-stage-container"]'
CLEAR_VIEW = '[data-cy="btn-clear-view-bar"]'
STAGE_DELETE = '[data-cy="view-bar"] [data-cy="btn-view-stage-delete"]'  # one per stage (not on "+ add stage")
OPERATOR_BROWSER = '[data-cy="action-browse-operations"]'  # the grid's "Browse operations" action
OPERATOR_SEARCH = '[data-cy="operators-browser-search"]'
OPERATOR_LIST = '[data-cy="operators-browser"]'
PROMPT = '[data-cy="operators-prompt-modal"]'  # an operator's form, then its output
MODAL = '[data-cy="modal"]'
MODAL_LOOKER = MODAL + ' [data-cy="looker"]'


# In the page: the time of the first Enter, and of the first moment the run list holds more "Show results"
# buttons than before it (arguments: that selector, the count before).
WATCH_RESULTS = """
const [selector, before] = arguments;
const state = window.__dinov2clipSearch = {enter: null, ready: null};
document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && state.enter === null) state.enter = performance.now();
}, {capture: true});
const observer = new MutationObserver(() => {
  if (state.enter !== null && document.querySelectorAll(selector).length > before) {
    state.ready = performance.now();
    observer.disconnect();
  }
});
observer.observe(document.body, {childList: true, subtree: true});
"""


class AppError(RuntimeError):
    """The App server or the page did not do what was expected; the message carries the logs."""


def browser_missing() -> str | None:
    """Why the browser cannot run here, or None."""
    import importlib.util

    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not os.access(exe, os.X_OK):
            return f"{exe} is missing (apt-get install chromium chromium-driver)"
    return None


def install_plugin(plugins_dir: Path) -> Path:
    """This checkout's FiftyOne plugin, laid out as `fiftyone plugins download` leaves it, in `plugins_dir`."""
    import shutil

    root = Path(__file__).resolve().parents[2]  # tests/support/devapp.py -> the checkout
    target = Path(plugins_dir) / "dinov2clip"
    (target / "fiftyone_dinov2clip").mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "fiftyone.yml", target / "fiftyone.yml")
    shutil.copy(root / "fiftyone_dinov2clip" / "plugin.py", target / "fiftyone_dinov2clip" / "plugin.py")
    return target


def clear_search_runs(dataset) -> None:
    """Forget the Similarity Search panel's runs on `dataset` (FiftyOne keeps them in an execution store), so a
    page opened next lists only the runs it starts. For datasets a test or benchmark made itself."""
    from fiftyone.operators.store import ExecutionStore

    ExecutionStore.create(SIMILARITY_STORE, dataset_id=dataset._doc.id).clear()


def _operator_request(operator_uri: str, dataset_name: str, params: dict, view: list | None = None) -> str:
    """The JSON body the App sends to run an operator (or subscribe through one) on the given view."""
    return json.dumps({"operator_uri": operator_uri, "dataset_name": dataset_name, "params": params,
                       "view": view or [], "filters": None, "selected": [], "selected_labels": []})


class AppServer:
    """`python -m fiftyone.server.main` (or `module`, e.g. "fiftyone_dinov2clip app") on a free port, in the
    environment FiftyOne was configured with."""

    def __init__(self, log_path: Path, env: dict | None = None, module: str = "fiftyone.server.main"):
        """`env`: variables to add to this process's environment (a None value removes one)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = {**os.environ, **(env or {}), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env = {k: v for k, v in env.items() if v is not None}  # None: unset it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *module.split(), "--port", str(self.port), "--address", "127.0.0.1"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait(self, timeout=60) -> "AppServer":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AppError(f"the App server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise AppError(f"the App server did not answer HTTP within {timeout} s:\n{self.tail()}")

    def execute(self, operator_uri: str, dataset_name: str, params: dict, view: list | None = None,
                timeout=600) -> dict:
        """POST /operators/execute, as the App does for an operator run; `view`: the App's current view, as
        serialized stages (the whole dataset when None)."""
        body = _operator_request(operator_uri, dataset_name, params, view).encode()
        req = urllib.request.Request(self.url + "/operators/execute", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = json.loads(r.read())
        if out.get("error"):
            raise AppError(f"{operator_uri} failed: {out['error']}\n{self.tail()}")
        return out

    def list_operators(self, dataset_name: str) -> dict:
        """POST /operators: what the App requests when a page loads (FiftyOne registers plugins then)."""
        req = urllib.request.Request(self.url + "/operators", data=json.dumps({"dataset_name": dataset_name}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def store_notices(self, dataset, writes: int, gap: float = 0.4, timeout: float = 30) -> list[float]:
        """Seconds from each of `writes` keys written into the search panel's execution store (from this
        process, as a finished run is) until the App server's SSE stream announces it to a subscriber, as it
        does to the panel, which then lists its runs again. The subscription is known to be live when the
        server replays a key written before it (FiftyOne sends a new subscriber the store's current state), so
        the first counted write goes out at once, through the poll like the rest."""
        import http.client
        import queue
        import threading

        from fiftyone.operators.store import ExecutionStore

        store = ExecutionStore.create(SIMILARITY_STORE, dataset_id=dataset._doc.id)
        live = f"dinov2clip-notice-{time.time_ns()}-live"
        store.set(live, {"written": "before subscribing"})
        body = _operator_request(SIMILARITY_NOTIFIER, dataset.name, {})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        seen: queue.Queue = queue.Queue()

        def next_notice(key: str) -> float:
            while True:
                try:
                    at, got = seen.get(timeout=timeout)
                except queue.Empty:
                    raise AppError(f"no execution-store notice of {key} within {timeout} s\n{self.tail()}") from None
                if got == key:
                    return at

        delays = []
        try:
            conn.request("POST", "/operators/subscribe-execution-store", body, {"Content-Type": "application/json"})
            stream = conn.getresponse()
            if stream.status != 200:
                raise AppError(f"subscribing to the execution store: HTTP {stream.status}\n{self.tail()}")

            def read():
                try:
                    for line in stream:
                        if line.startswith(b"data:"):
                            seen.put((time.perf_counter(), json.loads(line[5:]).get("key")))
                except (OSError, ValueError, AttributeError, http.client.HTTPException):
                    pass  # the connection was closed below (http.client drops its file: AttributeError)

            threading.Thread(target=read, daemon=True).start()
            next_notice(live)
            for i in range(writes):
                key = f"dinov2clip-notice-{time.time_ns()}-{i}"
                store.set(key, {"written": i})
                written = time.perf_counter()
                delays.append(next_notice(key) - written)
                store.delete(key)
                time.sleep(gap * (1 + i % 3) / 2)  # land the writes at different points of the poll
        finally:
            conn.close()
            store.delete(live)
        return delays

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server process has used so far (Linux)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> tuple[float, float]:
        """(current, peak) resident memory of the server process, MiB (Linux)."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines())
        return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))

    def tail(self, n=4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self):
        stop_process(self.proc, timeout=15)
        self._log.close()


def chromium(profile_dir: Path, log_path: Path):
    """Headless Debian chromium through Selenium, with browser and network logs, 1920×1080."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1920,1080", f"--user-data-dir={profile_dir}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, log_output=str(log_path)), options=opts)
    driver.set_page_load_timeout(30)
    return driver


class Browser:
    """The driver plus everything a failure message needs: console log, network log, server log."""

    def __init__(self, driver, server: AppServer, shot: Path):
        self.d = driver
        self.server = server
        self.shot = shot
        self.console: list[str] = []
        self.network: list[dict] = []

    def drain_logs(self):
        for e in self.d.get_log("browser"):
            self.console.append(f"[{e.get('level')}] {e.get('message')}")
        for e in self.d.get_log("performance"):
            self.network.append(json.loads(e["message"])["message"])

    def screenshot(self) -> Path:
        self.d.save_screenshot(str(self.shot))
        return self.shot

    def context(self) -> str:
        try:
            self.drain_logs()
        except Exception as e:  # the browser may be gone
            self.console.append(f"(could not read the browser log: {e})")
        console = "\n".join(self.console[-60:]) or "(empty)"
        return f"\n--- browser console log ---\n{console}\n--- App server log (tail) ---\n{self.server.tail()}"

    def wait_for(self, what: str, cond, timeout: float):
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.05).until(cond)
        except TimeoutException:
            raise AppError(f"timed out after {timeout} s waiting for {what}; screenshot {self.shot}"
                           f"{self.context()}") from None

    def css(self, selector: str, clickable=False, timeout=30):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC

        wanted = EC.element_to_be_clickable if clickable else EC.presence_of_element_located
        return self.wait_for(selector, wanted((By.CSS_SELECTOR, selector)), timeout)

    def open_dataset(self, name: str, timeout=45):
        # The Enterprise popover's backdrop would intercept clicks: mark it seen before the App loads.
        self.d.get(self.server.url + "/favicon.ico")
        self.d.execute_script("window.localStorage.setItem('fiftyone-enterprise-tooltip-seen', 'true')")
        self.d.get(f"{self.server.url}/datasets/{name}")
        self.css(GRID_READY, timeout=timeout)

    def search(self, query: str, timeout=120) -> float:
        """Magnifier → query → Enter; returns seconds from Enter until the run offers "Show results", as the
        page's own clock saw them (a key listener and a MutationObserver), so how often this process looks
        does not add to it."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        selector = RUN_LIST + " " + SHOW_RESULTS
        before = len(self.d.find_elements(By.CSS_SELECTOR, selector))
        self.d.execute_script(WATCH_RESULTS, selector, before)
        self.css(MAGNIFIER, clickable=True).click()
        box = self.css(QUERY_BOX, clickable=True)
        box.send_keys(query)
        box.send_keys(Keys.ENTER)
        looks = 0

        def run_finished(_):
            nonlocal looks
            looks += 1
            if self.d.execute_script("return window.__dinov2clipSearch.ready") is not None:
                return "ok"
            if looks % 10:  # the failure checks read the logs: not on every look
                return False
            if self.server.proc.poll() is not None:
                return "the App server exited"
            self.drain_logs()
            failed = [line for line in self.console if "Similarity search failed" in line
                      or "Error executing operator" in line]
            if failed:
                return "failed: " + failed[0][:300]
            panel = self.d.find_elements(By.CSS_SELECTOR, PANEL)
            if panel and ("failed" in panel[0].text.lower() or "error" in panel[0].text.lower()):
                return f"failed: the Similarity Search panel says {panel[0].text!r}"
            return False

        state = self.wait_for("the Similarity Search panel's run to complete", run_finished, timeout)
        if state != "ok":
            raise AppError(f"the App's similarity search did not complete ({state}); screenshot {self.shot}"
                           f"{self.context()}")
        enter, ready = self.d.execute_script("const s = window.__dinov2clipSearch; return [s.enter, s.ready]")
        return (ready - enter) / 1000

    def show_results(self, timeout=30) -> tuple[list[str], float]:
        """Click the newest run's "Show results"; returns (the re-sorted grid's sample ids, seconds from the
        click until that page arrived)."""
        from selenium.webdriver.common.by import By

        from selenium.webdriver.common.keys import Keys

        self.d.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)  # close the query popout, if open

        def newest_button(_):
            """The newest run's button: runs are listed oldest first; the run on screen has a disabled one,
            and an older run's (enabled) would re-apply a view the App may answer from its cache."""
            buttons = self.d.find_elements(By.CSS_SELECTOR, RUN_LIST + " " + SHOW_RESULTS)
            last = buttons[-1] if buttons else None
            ready = last is not None and last.get_attribute("disabled") is None and last.is_displayed()
            return last if ready else False

        button = self.wait_for("the newest run's \"Show results\" button", newest_button, timeout)
        since = self.cdp_now()
        start = time.perf_counter()
        button.click()
        self.css(VIEW_STAGE, timeout=timeout)
        order = self.wait_for("the re-sorted grid's paginateSamplesQuery response",
                              lambda _: self.graphql_samples(since), timeout)[-1]
        took = time.perf_counter() - start
        self.css(GRID_READY, timeout=timeout)
        return order, took

    def clear_view(self, timeout=30):
        """Back to the whole dataset (the view bar's clear button), as before a new search of everything: the
        magnifier searches the current view, which after "Show results" holds only that run's results."""
        from selenium.webdriver.common.by import By

        self.css(CLEAR_VIEW, clickable=True, timeout=timeout).click()
        self.wait_for("the view bar to clear", lambda d: not d.find_elements(By.CSS_SELECTOR, STAGE_DELETE), timeout)
        self.css(GRID_READY, timeout=timeout)

    def open_operator(self, search: str, timeout=60):
        """The operator browser → the operator `search` finds (typed, then Enter) → its form, once it can run."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        self.css(OPERATOR_BROWSER, clickable=True).click()
        box = self.css(OPERATOR_SEARCH, clickable=True)
        box.send_keys(search)
        self.wait_for(f"the operator browser to list {search!r}",
                      lambda d: search.lower() in d.find_element(By.CSS_SELECTOR, OPERATOR_LIST).text.lower(), 15)
        box.send_keys(Keys.ENTER)
        self.wait_for(f"the form of {search!r}", lambda _: self._prompt_button("Execute"), timeout)
        return self.d.find_element(By.CSS_SELECTOR, PROMPT)

    def form_input(self, label: str):
        """The open form's input under the label `label`."""
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.XPATH, f"//*[@data-cy='operators-prompt-modal']//p[normalize-space()='{label}']"
                                             "/ancestor::div[contains(@class, 'MuiGrid-item')][1]//input")

    def execute_operator(self, expect: str, timeout=120) -> str:
        """Execute the open form; returns the operator's output as the App shows it, once it shows `expect`,
        then closes it."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By

        def output(_):
            try:
                text = self.d.find_element(By.CSS_SELECTOR, PROMPT).text
            except WebDriverException:  # not there yet, or re-rendered
                return False
            return text if expect in text and self._prompt_button("Close") else False

        # a dynamic form resolves again after each input, its button disabled meanwhile
        self.wait_for("the form's Execute button", lambda _: self._prompt_button("Execute"), 30).click()
        text = self.wait_for(f"the operator's output ({expect!r})", output, timeout)
        self._prompt_button("Close").click()
        return text

    def _prompt_button(self, label: str):
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By

        try:  # the prompt re-renders while it runs
            return next((b for b in self.d.find_elements(By.CSS_SELECTOR, PROMPT + " button")
                         if b.text == label and b.is_enabled()), None)
        except WebDriverException:
            return None

    def open_first_tile(self, timeout=60) -> str:
        """Click the grid's top-left tile once the grid has drawn it; returns the sample id the modal opened (its
        URL's `id`)."""
        import urllib.parse

        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By

        def click_first(_):  # a new view's grid shows a loading animation first, then replaces its tiles
            try:
                tiles = [t for t in self.d.find_elements(By.CSS_SELECTOR, GRID_READY) if t.is_displayed()]
                if not tiles:
                    return False
                min(tiles, key=lambda t: (round(t.rect["y"]), round(t.rect["x"]))).click()
                return True
            except WebDriverException:
                return False

        self.wait_for("the grid's first tile", click_first, timeout)
        self.css(MODAL_LOOKER, timeout=timeout)
        query = urllib.parse.parse_qs(urllib.parse.urlparse(self.d.current_url).query)
        return query.get("id", [None])[0]

    def modal_field_checkbox(self, path: str):
        """The modal sidebar's show/hide checkbox of field `path` (its `input` says whether it is shown)."""
        from selenium.webdriver.common.by import By

        return self.css(f'{MODAL} [data-cy="checkbox-{path}"]')

    def modal_pixels(self):
        """The modal's canvas as an RGB array (a screenshot of the element)."""
        import numpy as np
        from PIL import Image
        from selenium.webdriver.common.by import By

        png = self.d.find_element(By.CSS_SELECTOR, MODAL_LOOKER).screenshot_as_png
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)

    def graphql_samples(self, after_ts: float) -> list[list[str]] | None:
        """Sample ids of each `paginateSamplesQuery` response for a view with a `Select` stage (what "Show
        results" applies) requested after `after_ts` (a CDP monotonic timestamp), oldest first; None while
        none has finished or one is still in flight (requests the App cancelled do not count)."""
        self.drain_logs()
        sent = {}
        for m in self.network:
            if m["method"] == "Network.requestWillBeSent" and m["params"]["timestamp"] > after_ts:
                req = m["params"]["request"]
                if "/graphql" in req["url"] and "paginateSamplesQuery" in (req.get("postData") or ""):
                    view = json.loads(req["postData"])["variables"]["view"]
                    if any(st["_cls"] == "fiftyone.core.stages.Select" for st in view):
                        sent[m["params"]["requestId"]] = m["params"]["timestamp"]
        finished = {m["params"]["requestId"] for m in self.network
                    if m["method"] == "Network.loadingFinished" and m["params"]["requestId"] in sent}
        failed = {m["params"]["requestId"] for m in self.network  # e.g. superseded by a newer page request
                  if m["method"] == "Network.loadingFailed" and m["params"]["requestId"] in sent}
        if not finished or finished | failed != set(sent):
            return None
        out = []
        for rid in sorted(finished, key=sent.get):
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
        import numpy as np
        from PIL import Image
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

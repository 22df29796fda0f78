"""The stock `clip-retrieval` executable with `--clip_model dinov2clip:...` (its own environment: DESIGN §1).

In the main environment clip-retrieval is absent by design and these tests skip; CI's clip-retrieval
environment sets DINOV2CLIP_REQUIRE_CLIP_RETRIEVAL=1, which turns that skip into a failure."""
import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


if os.environ.get("DINOV2CLIP_REQUIRE_CLIP_RETRIEVAL") == "1":
    import clip_retrieval  # noqa: F401  (must be present in the clip-retrieval environment)
else:
    pytest.importorskip("clip_retrieval", reason="clip-retrieval lives in its own environment")

EXE = Path(sys.executable).with_name("clip-retrieval")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run_cli(*args, timeout=600):
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)


def image_bytes(color, size=(80, 60)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def core_model(tiny_dir):
    """The core model as the adapter loads it (default device and dtype), called directly."""
    import dinov2clip

    return dinov2clip.load(str(tiny_dir))


def test_registry_order_in_a_fresh_process():
    code = "import all_clip.main as m; print(list(m._CLIP_REGISTRY)[-2:])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['dinov2clip', '']"


@pytest.fixture(scope="module")
def wds_run(tmp_path_factory, tiny_dir):
    """A webdataset shard (img2dataset layout, one corrupt image) through `clip-retrieval inference`."""
    root = tmp_path_factory.mktemp("wds")
    shard = root / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, color in enumerate(COLORS + ["corrupt"]):
            key = f"{i:09d}"
            jpg = b"\xff\xd8\xff not a jpeg" if color == "corrupt" else image_bytes(color)
            files = {"jpg": jpg, "txt": f"a {color} thing".encode(), "json": json.dumps({"key": key}).encode()}
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = root / "embeddings"
    res = run_cli("inference", "--input_format", "webdataset", "--input_dataset", shard, "--output_folder", out,
                         "--clip_model", f"dinov2clip:{tiny_dir}", "--enable_metadata", "True",
                         "--batch_size", "4", "--num_prepro_workers", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def read_run(out):
    import pandas as pd

    meta = pd.read_parquet(out / "metadata" / "metadata_0.parquet")
    img = np.load(out / "img_emb" / "img_emb_0.npy")
    txt = np.load(out / "text_emb" / "text_emb_0.npy") if (out / "text_emb").exists() else None
    return meta, img, txt


def test_webdataset_inference_matches_core(wds_run, core_model):
    meta, img, txt = read_run(wds_run)
    assert img.dtype == np.float16 and len(meta) == len(COLORS)  # the corrupt sample was skipped
    colors = [COLORS[int(k)] for k in meta["key"]]
    expected = core_model.encode_image([Image.open(io.BytesIO(image_bytes(c))) for c in colors]).numpy()
    np.testing.assert_allclose(img.astype(np.float32), expected, atol=1e-3)
    expected_txt = core_model.encode_text([f"a {c} thing" for c in colors]).numpy()
    np.testing.assert_allclose(txt.astype(np.float32), expected_txt, atol=1e-3)
    assert list(meta["caption"]) == [f"a {c} thing" for c in colors]


def test_folder_inference_skips_corrupt_image(tmp_path, tiny_dir, core_model, image_folder):
    out = tmp_path / "out"
    res = run_cli("inference", "--input_dataset", image_folder, "--output_folder", out, "--clip_model",
                         f"dinov2clip:{tiny_dir}", "--enable_text", "False", "--batch_size", "3",
                         "--num_prepro_workers", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    meta, img, _ = read_run(out)
    paths = list(meta["image_path"])
    assert len(paths) == 7 and not any("corrupt" in p for p in paths)
    np.testing.assert_allclose(img.astype(np.float32), core_model.encode_image(paths).numpy(), atol=1e-3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, payload):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/knn-service", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def wait_http(url: str, proc: subprocess.Popen, what: str, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert proc.poll() is None, f"{what} exited: {proc.stderr.read().decode()[-3000:]}"
            assert time.time() < deadline, f"{what} did not start"
            time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@contextlib.contextmanager
def serving_back(tmp_path, name: str, index, tiny_dir):
    """`clip-retrieval back` serving `index` as `name` with our model, answering; yields its port."""
    (tmp_path / "indices.json").write_text(json.dumps({name: str(index)}))
    port = free_port()
    back = subprocess.Popen(
        [str(EXE), "back", "--port", str(port), "--indices_paths", str(tmp_path / "indices.json"),
         "--clip_model", f"dinov2clip:{tiny_dir}", "--enable_mclip_option", "False",
         "--provide_aesthetic_embeddings", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/indices-list", back, "clip-retrieval back")
        yield port
    finally:
        stop(back)


def test_index_and_back_answer_text_and_image_queries(wds_run, tmp_path, tiny_dir, core_model):
    index = tmp_path / "index"
    res = run_cli("index", "--embeddings_folder", wds_run, "--index_folder", index)
    assert res.returncode == 0, res.stderr[-3000:]
    with serving_back(tmp_path, "tiny", index, tiny_dir) as port:
        meta, img, _ = read_run(wds_run)
        query = "a green thing"
        best = int(np.argmax(img.astype(np.float32) @ core_model.encode_text([query])[0].numpy()))
        hits = post(port, {"text": query, "modality": "image", "num_images": 3, "indice_name": "tiny",
                           "deduplicate": False})
        assert hits[0]["id"] == best
        probe = image_bytes("blue")
        q = core_model.encode_image([Image.open(io.BytesIO(probe))])[0].numpy()
        best_img = int(np.argmax(img.astype(np.float32) @ q))
        hits = post(port, {"image": base64.b64encode(probe).decode(), "modality": "image", "num_images": 3,
                           "indice_name": "tiny", "deduplicate": False})
        assert hits[0]["id"] == best_img and COLORS[int(meta["key"][best_img])] == "blue"


@pytest.mark.parametrize("spec,match", [
    ("dinov2clip:no-such-preset", "unknown preset 'no-such-preset'"),
    ("dinov2clip:/no/such/dir", "model directory not found"),
    ("dinov2clipX", "must be 'dinov2clip' or 'dinov2clip:SOURCE'"),
])
def test_bad_model_spec_is_our_one_line(tmp_path, image_folder, spec, match):
    res = run_cli("inference", "--input_dataset", image_folder, "--output_folder", tmp_path / "o",
                         "--clip_model", spec, "--enable_text", "False", timeout=300)
    assert res.returncode != 0
    ours = [line for line in res.stderr.splitlines() if line.startswith("dinov2clip: error:")]
    assert len(ours) == 1 and match in ours[0]
    assert "openaipublic" not in res.stderr and "ViT-B-32" not in res.stderr  # no fall-through to OpenAI CLIP
    assert not (tmp_path / "o" / "img_emb").exists()


def test_pyspark_distribution_equals_sequential(tmp_path, tiny_dir):
    """`--distribution_strategy pyspark` on a local Spark session: each output partition runs as its own
    Spark task in a fresh Python worker, which registers dinov2clip through the start-up hook."""
    if os.environ.get("DINOV2CLIP_REQUIRE_CLIP_RETRIEVAL") != "1":
        pytest.importorskip("pyspark")
    import pandas as pd

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    common = ["--input_dataset", folder, "--clip_model", f"dinov2clip:{tiny_dir}", "--enable_text", "False",
              "--write_batch_size", "4", "--batch_size", "2", "--num_prepro_workers", "1"]
    runs = {}
    for strategy in ("sequential", "pyspark"):
        out = tmp_path / strategy
        res = subprocess.run([str(EXE), "inference", *map(str, common), "--output_folder", str(out),
                              "--distribution_strategy", strategy], capture_output=True, text=True, timeout=900,
                             env={**ENV, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable})
        assert res.returncode == 0, res.stderr[-3000:]
        parts = sorted((out / "img_emb").glob("img_emb_*.npy"))
        assert len(parts) == 3
        emb = np.concatenate([np.load(p) for p in parts])
        paths = pd.concat([pd.read_parquet(out / "metadata" / f"metadata_{i}.parquet") for i in range(3)])
        runs[strategy] = dict(zip(paths["image_path"], emb))
        if strategy == "pyspark":
            log = res.stdout + res.stderr
            assert "No pyspark session found, creating a new one!" in log
            assert all(f"Starting work on task {i}" in log for i in range(3))
    assert sorted(runs["pyspark"]) == sorted(runs["sequential"]) and len(runs["pyspark"]) == 12
    for key, vec in runs["sequential"].items():
        np.testing.assert_allclose(runs["pyspark"][key].astype(np.float32), vec.astype(np.float32), atol=1e-3)


FRONT_PORT = 1235  # `clip-retrieval front` always listens there


def test_clip_retrievals_own_front_page_shows_our_back_s_results_in_chromium(tmp_path, tiny_dir, core_model):
    """clip-retrieval's web page (its `front`, in headless Chromium) queries our model's `back`: a text query
    shows the pictures of the best matches, in the order our model ranks them; the screenshot is kept."""
    sys.path.insert(0, str(REPO / "tests"))
    from support.devapp import browser_missing, chromium

    if (why := browser_missing()) is not None:
        pytest.fail(why) if os.environ.get("DINOV2CLIP_REQUIRE_CLIP_RETRIEVAL") == "1" else pytest.skip(why)
    from selenium.webdriver.support.ui import WebDriverWait

    photos = tmp_path / "photos"  # absolute, RGB JPEGs: what the front page can show (README's traps)
    photos.mkdir()
    for colour in COLORS:
        (photos / f"{colour}.jpg").write_bytes(image_bytes(colour))
    emb, index = tmp_path / "embeddings", tmp_path / "index"
    res = run_cli("inference", "--input_dataset", photos, "--output_folder", emb, "--clip_model",
                  f"dinov2clip:{tiny_dir}", "--enable_text", "False", "--batch_size", "3", "--num_prepro_workers", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert run_cli("index", "--embeddings_folder", emb, "--index_folder", index).returncode == 0
    with serving_back(tmp_path, "photos", index, tiny_dir) as port:
        front = subprocess.Popen([str(EXE), "front", "--default_backend", f"http://127.0.0.1:{port}/"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, start_new_session=True)
        driver = None
        try:
            wait_http(f"http://127.0.0.1:{FRONT_PORT}/", front, "clip-retrieval front")
            query = "a purple thing"
            paths, _ = zip(*sorted(((p, c) for p, c in ((str(photos / f"{c}.jpg"), c) for c in COLORS))))
            scores = core_model.encode_image(list(paths)).numpy() @ core_model.encode_text([query])[0].numpy()
            ranked = [Path(paths[i]).stem for i in np.argsort(-scores)]
            driver = chromium(tmp_path / "profile", tmp_path / "chromedriver.log")
            driver.get(f"http://127.0.0.1:{FRONT_PORT}/?back=http://127.0.0.1:{port}&index=photos"
                       f"&query={urllib.request.quote(query)}")
            shown = """const front = document.querySelector('clip-front');
                const root = front && front.shadowRoot; if (!root) return [];
                return [...root.querySelectorAll('img')]
                    .filter(i => i.src.startsWith('data:image') && i.naturalWidth > 0).map(i => i.src);"""
            images = WebDriverWait(driver, 120).until(lambda d: d.execute_script(shown) or None)
            if os.environ.get("DINOV2CLIP_TEST_ARTIFACTS"):
                driver.save_screenshot(str(Path(os.environ["DINOV2CLIP_TEST_ARTIFACTS"]) / "clip-retrieval-front.png"))
            hits = post(port, {"text": query, "modality": "image", "num_images": len(COLORS), "indice_name": "photos",
                               "deduplicate": False})
            assert [Path(h["image_path"]).stem for h in hits] == ranked  # the back ranks as our model does
            by_picture = {h["image"]: Path(h["image_path"]).stem for h in hits}
            on_page = [by_picture.get(src.split(",", 1)[1].strip()) for src in images]  # "data:…;base64, …"
            assert on_page and None not in on_page, "the page shows pictures the back did not return"
            assert on_page == [c for c in ranked if c in on_page], (on_page, ranked)  # in our model's order
            assert on_page[0] == ranked[0]
        finally:
            if driver is not None:
                driver.quit()
            stop(front)

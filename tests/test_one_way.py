"""One way to do each thing (issue 23): the core image loop, the folder walker, first_line, the process cache,
and training's modules without an import circle."""
import ast
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from dinov2clip.embed import iter_pixel_batches
from dinov2clip.errors import first_line
from dinov2clip.factory import ProcessCache
from dinov2clip.formats import images_under

ROOT = Path(__file__).resolve().parents[1]


def _size(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.size)


def _mean(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32)


def test_one_decode_feeds_several_transforms_and_a_bad_image_fails_alone(tmp_path):
    paths = []
    for i, size in enumerate([(10, 20), (30, 40), (50, 60)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", size, (i * 50, 0, 0)).save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    items = [paths[0], tmp_path / "bad.png", paths[1], paths[2]]
    got = list(iter_pixel_batches({"size": _size, "colour": _mean}, items, batch_size=2, workers=2))
    assert [idx for idx, _, _ in got] == [[0], [2, 3]]
    assert got[0][2] and got[0][2][0][0] == 1 and "bad.png" in got[0][2][0][1] and not got[1][2]
    assert got[1][1]["size"].tolist() == [[30, 40], [50, 60]]
    assert got[1][1]["colour"][:, 0].tolist() == [50.0, 100.0]
    # one transform: plain tensors; a batch of bad images only: None
    (tmp_path / "bad2.png").write_bytes(b"")
    one = list(iter_pixel_batches(_size, [tmp_path / "bad.png", tmp_path / "bad2.png", paths[0]], 2))
    assert one[0][:2] == ([], None) and len(one[0][2]) == 2 and one[1][1].tolist() == [[10, 20]]


def test_a_stream_is_read_a_batch_ahead_not_whole(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    pulled = []

    def stream():
        for i in range(1000):
            pulled.append(i)
            yield path

    batches = iter_pixel_batches(_size, stream(), batch_size=4, workers=2)
    idx, pixels, _ = next(batches)
    assert idx == [0, 1, 2, 3] and len(pixels) == 4 and len(pulled) <= 8  # this batch and the one decoding ahead
    idx, _, _ = next(batches)
    assert idx == [4, 5, 6, 7]
    batches.close()


def test_folder_walker_keeps_broken_links_and_sorts(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.JPG", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    assert [p.relative_to(tmp_path).as_posix() for p in images_under(tmp_path)] == ["a.png", "b/2.JPG", "gone.png"]


@pytest.mark.parametrize("error, line", [
    (ValueError("first\nsecond"), "first"),
    (ValueError("  \n padded \n"), "padded"),
    (KeyError(), "KeyError"),
    (OSError(""), "OSError"),
])
def test_first_line(error, line):
    assert first_line(error) == line


def test_process_cache_is_bounded_lru_and_builds_once_across_threads():
    cache, made = ProcessCache(2), []

    def make(key):
        def build():
            made.append(key)
            time.sleep(0.05)  # threads arriving meanwhile must wait for this build, not start their own
            return key.upper()
        return build

    threads = [threading.Thread(target=cache.get, args=("a", make("a"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == ["a"]
    cache.get("b", make("b"))
    assert cache.get("a", make("a")) == "A"  # a is now the most recent: c evicts b
    cache.get("c", make("c"))
    assert len(cache) == 2 and made == ["a", "b", "c"]
    cache.get("b", make("b"))
    assert made == ["a", "b", "c", "b"]
    assert cache.get(None, make("x")) == "X" and cache.get(None, make("x")) == "X" and len(cache) == 2
    assert made[-2:] == ["x", "x"]  # content that cannot be keyed is never cached


def test_training_has_no_import_circle():
    graph = {}
    for path in (ROOT / "training").glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):  # lazy (function-level) imports included
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.level == 1:
                    deps.add(node.module.split(".")[0])
                elif node.module.startswith("training."):
                    deps.add(node.module.split(".")[1])
        graph[path.stem] = deps

    def reaches(start):
        seen, todo = set(), [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    assert [m for m in graph if m in reaches(m)] == []
    # validation and export read the options without loading the loop
    code = "import sys, training.validation, training.export; print('training.train' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"

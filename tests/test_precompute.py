"""The precompute stage: webdataset shards → per-shard float16 arrays (DESIGN §5)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2clip.errors import UserError

pytest.importorskip("fsspec", reason="shards are opened with fsspec (the [train] extra)")
pytest.importorskip("braceexpand", reason="shard lists use brace patterns (the [train] extra)")
from training import precompute as pc  # noqa: E402
from training import shards as fmt  # noqa: E402
from dinov2clip.dinov2 import DinoV2Encoder, pool  # noqa: E402
from training.data import EmbeddingSet  # noqa: E402
from training.synthetic import write_shapes_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards of 12 shapes; two samples carry corrupt JPEG bytes."""
    return write_shapes_shards(tmp_path_factory.mktemp("wds"), 36, per_shard=12, seed=1, corrupt=2)


@pytest.fixture(scope="module")
def done(shards, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "train"
    summary = pc.precompute(str(tiny_dir), [str(p) for p in shards], out, batch_size=5, device="cpu", dtype="fp32",
                            workers=2, progress=False)
    return out, summary


def test_outputs_shapes_counts_and_skips(done, shards):
    out, summary = done
    assert summary == {**summary, "shards": 3, "written": 3, "done_before": 0, "samples": 34, "skipped": 2}
    metas = [json.loads((out / "shards" / p.stem / fmt.META).read_text()) for p in shards]
    assert [m["count"] for m in metas] and sum(m["skipped"] for m in metas) == 2
    for m in metas:
        assert m["skipped"] == len(m["skipped_keys"]) and m["count"] + m["skipped"] == 12
        assert m["num_patches"] == 256 and m["num_register_tokens"] == 0
        d = out / "shards" / m["name"]
        for name, dim in (("dinov2_cls", 32), ("dinov2_patch_mean", 32), ("clip_image", 32), ("clip_text", 32)):
            arr = np.load(d / f"{name}.npy", mmap_mode="r")
            assert arr.dtype == np.float16 and arr.shape == (m["count"], dim)
        text = json.loads((d / fmt.TEXT).read_text())
        assert len(text["keys"]) == len(text["captions"]) == m["count"]
        assert not set(text["keys"]) & set(m["skipped_keys"])
    assert not list((out / "shards").glob(".*"))  # no temporary directories left


def test_values_match_the_model_and_teacher(done, shards, tiny_dir):
    """Every pooling rebuilt from CLS + patch mean equals the core's pooled DINOv2 embedding; the teacher and
    caption embeddings equal the eval pipeline's (the teacher's own preprocessing)."""
    import io

    from PIL import Image

    out, _ = done
    models = m = pc.load_encoders(str(tiny_dir), device="cpu", dtype="fp32")
    d = out / "shards" / shards[0].stem
    text = json.loads((d / fmt.TEXT).read_text())
    samples = {s["__key__"]: s for s in pc.read_samples(str(shards[0]))}
    images = [Image.open(io.BytesIO(samples[k]["jpg"])).convert("RGB") for k in text["keys"]]
    pixels = torch.stack([m.preprocess(im) for im in images])
    with torch.no_grad():
        direct = {p: DinoV2Encoder(m.image_encoder.backbone, p)(pixels) for p in ("mean", "cls", "cls+mean")}
    cls, pm = (torch.from_numpy(np.load(d / f"{k}.npy")).float() for k in ("dinov2_cls", "dinov2_patch_mean"))
    for pooling in ("mean", "cls", "cls+mean"):
        torch.testing.assert_close(pool(cls, pm, pooling, 256), direct[pooling], atol=2e-2, rtol=1e-2)
    teacher = models.encode_teacher(torch.stack([models.teacher_transform(im) for im in images]))
    torch.testing.assert_close(torch.from_numpy(np.load(d / "clip_image.npy")).float(), teacher, atol=2e-3, rtol=0)
    torch.testing.assert_close(torch.from_numpy(np.load(d / "clip_text.npy")).float(), m.encode_text(text["captions"]),
                               atol=2e-3, rtol=0)
    assert text["captions"][0].startswith("a ")


def test_resume_skips_finished_and_cleans_partial(done, shards, tiny_dir):
    out, _ = done
    junk = out / "shards" / f".{shards[1].stem}.tmp-999-0a1b2c3d"  # a killed run's half-written shard
    junk.mkdir()
    # another node's shard in progress on a shared filesystem: not one of ours, never touched
    theirs = out / "shards" / ".other-00007.tmp-4242-deadbeef"
    theirs.mkdir()
    again = pc.precompute(str(tiny_dir), [str(p) for p in shards], out, progress=False)
    assert again == {"shards": 3, "done_before": 3, "written": 0, "samples": 0, "skipped": 0, "unreadable": {}}
    assert not junk.exists() and theirs.is_dir()
    theirs.rmdir()


def test_rank_split_is_identical_to_one_process(done, shards, tiny_dir, tmp_path):
    """Two ranks (RANK/WORLD_SIZE) take alternate shards; together they write what one process wrote,
    byte for byte; an fsspec URL (file://) reads like a path."""
    out, _ = done
    urls = [f"file://{p}" for p in shards]
    parts = [pc.precompute(str(tiny_dir), urls, tmp_path, batch_size=5, device="cpu", dtype="fp32", rank=r, world=2,
                           progress=False)["shards"] for r in (0, 1)]
    assert parts == [2, 1]
    for p in shards:
        for name in fmt.ARRAYS:
            assert (tmp_path / "shards" / p.stem / f"{name}.npy").read_bytes() == \
                (out / "shards" / p.stem / f"{name}.npy").read_bytes()
    assert fmt.manifest(tmp_path)["sha256"] == fmt.manifest(out)["sha256"]
    data = EmbeddingSet([out], "mean")
    assert len(data) == 34 and data.input_dim == 32


@pytest.mark.parametrize("specs, expect", [
    (["{dir}/shards-0000{{0..1}}.tar"], 2),
    (["{dir}/*.tar"], 3),
    (["{dir}/nothing-*.tar"], UserError),
    ([], UserError),
])
def test_expand_shards(shards, specs, expect):
    specs = [s.format(dir=shards[0].parent) for s in specs]
    if expect is UserError:
        with pytest.raises(UserError):
            pc.expand_shards(specs)
    else:
        assert len(pc.expand_shards(specs)) == expect


def test_sigkill_inside_a_shard_write_then_resume(shards, tiny_dir, done, tmp_path):
    """Killed between two array files of the second shard: a rerun rewrites it whole; equal bytes."""
    out, _ = done
    script = f"""
import os, signal, numpy as np
import training.precompute as pc
calls = [0]
real = np.save
def save(*a, **k):
    calls[0] += 1
    if calls[0] == 6:  # shard 2, its second array
        os.kill(os.getpid(), signal.SIGKILL)
    real(*a, **k)
pc.np.save = save
pc.precompute({str(tiny_dir)!r}, {[str(p) for p in shards]!r}, {str(tmp_path)!r}, batch_size=5, device="cpu",
              dtype="fp32", workers=2, progress=False)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert fmt.is_done(tmp_path, shards[0].stem) and not fmt.is_done(tmp_path, shards[1].stem)
    assert list((tmp_path / "shards").glob(".*.tmp-*"))
    summary = pc.precompute(str(tiny_dir), [str(p) for p in shards], tmp_path, batch_size=5, device="cpu",
                            dtype="fp32", workers=2, progress=False)
    assert summary["done_before"] == 1 and summary["written"] == 2
    assert fmt.manifest(tmp_path)["sha256"] == fmt.manifest(out)["sha256"]


def test_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training.run", "precompute", "--model", "x", "--shards",
                           str(tmp_path / "none-*.tar"), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no shard matches" in proc.stderr


def test_an_unreadable_shard_is_skipped_named_and_retried(shards, tiny_dir, tmp_path):
    """A truncated tar between good ones: the others are written, it is named and written nowhere (no half
    shard), a rerun retries it; --strict stops at it in one line."""
    bad = tmp_path / "wds" / "shapes-00099.tar"
    bad.parent.mkdir()
    bad.write_bytes(shards[1].read_bytes()[: shards[1].stat().st_size // 3])
    inputs = [str(shards[0]), str(bad), str(shards[2])]
    out = tmp_path / "pre"
    args = ["precompute", "--model", tiny_dir, "--shards", *inputs, "--out", out, "--device", "cpu", "--dtype",
            "fp32", "--batch-size", "5", "--workers", "1", "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "training.run", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped unreadable shard" in proc.stderr and "shapes-00099.tar" in proc.stderr
    assert "'written': 2" in proc.stdout and "shapes-00099.tar" in proc.stdout
    assert fmt.is_done(out, shards[0].stem) and fmt.is_done(out, shards[2].stem) and not fmt.is_done(out, bad.stem)
    assert not list((out / "shards").glob(".*"))
    again = pc.precompute(str(tiny_dir), inputs, out, batch_size=5, device="cpu", dtype="fp32", workers=1,
                          progress=False)
    assert again["done_before"] == 2 and list(again["unreadable"]) == [str(bad)]  # retried, still unreadable
    strict = subprocess.run([sys.executable, "-m", "training.run", *map(str, args), "--strict"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    errors = [line for line in strict.stderr.splitlines() if "error" in line]
    assert strict.returncode == 2 and len(errors) == 1 and "--strict" in errors[0] and "Traceback" not in strict.stderr


def test_captions_bounded_and_bad_ones_skipped(tmp_path, tiny_dir):
    """A 64,000-character alt text is cut (and counted); an empty caption, a blank one and a json caption that
    is not a string are skipped and named, never trained on."""
    import io
    import tarfile

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "PNG")
    members = {"long.png": buf.getvalue(), "long.txt": b"x" * 64_000, "empty.png": buf.getvalue(), "empty.txt": b"",
               "blank.png": buf.getvalue(), "blank.txt": b"  \n ", "num.png": buf.getvalue(),
               "num.json": json.dumps({"caption": 42}).encode(), "ok.png": buf.getvalue(),
               "ok.json": json.dumps({"caption": "a red square"}).encode()}
    tar_path = tmp_path / "captions.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    summary = pc.precompute(str(tiny_dir), [str(tar_path)], tmp_path / "out", batch_size=4, device="cpu",
                            dtype="fp32", workers=1, progress=False)
    assert summary["samples"] == 2 and summary["skipped"] == 3
    meta = json.loads((tmp_path / "out" / "shards" / "captions" / fmt.META).read_text())
    assert set(meta["skipped_keys"]) == {"empty", "blank", "num"} and meta["captions_cut"] == 1
    captions = dict(zip(*json.loads((tmp_path / "out" / "shards" / "captions" / fmt.TEXT).read_text()).values()))
    assert len(captions["long"]) == pc.MAX_CAPTION_CHARS and captions["long"].endswith(pc.CUT_MARK)
    assert captions["ok"] == "a red square"

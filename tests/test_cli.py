"""The installed `dinov2clip` console script, run as a user runs it."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dinov2clip
from dinov2clip.cli import main
from dinov2clip.embed import load_embeddings

EXE = Path(sys.executable).with_name("dinov2clip")


def run(*args):
    assert EXE.exists(), "console script not installed: pip install -e ."
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, timeout=300)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("dinov2clip:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def embedded(tiny_dir, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "emb.npz"
    res = run("embed", image_folder, "--model", tiny_dir, "--out", out, "--dtype", "fp32", "--batch-size", "8")
    return res, out


def test_embed_skips_and_counts_bad_images(embedded, tiny_model, image_folder):
    res, out = embedded
    assert res.returncode == 0, res.stderr
    assert "embedded 7 images, skipped 1 unreadable" in res.stdout
    assert "corrupt.jpg" in res.stderr
    emb, items, meta = load_embeddings(out)
    assert len(items) == 7 and not any("corrupt" in i for i in items)
    assert meta["fingerprint"] == tiny_model.fingerprint and meta["skipped"] == 1
    direct = tiny_model.encode_image(items).numpy()
    np.testing.assert_allclose(emb, direct, atol=1e-5)


def test_search_ranks_by_cosine(embedded, tiny_model):
    _, out = embedded
    res = run("search", out, "a red circle", "-k", "3", "--dtype", "fp32")
    assert res.returncode == 0, res.stderr
    emb, items, _ = load_embeddings(out)
    scores = torch.from_numpy(emb) @ tiny_model.encode_text(["a red circle"])[0]
    expected = [items[i] for i in torch.argsort(scores, descending=True)[:3]]
    got = [line.split("\t")[1] for line in res.stdout.strip().splitlines()]
    assert got == expected


def test_search_says_when_a_long_query_was_cut(embedded, tiny_model):
    _, out = embedded
    short = run("search", out, "a red circle", "-k", "3", "--dtype", "fp32")
    long = run("search", out, "a red circle " + "x" * 5000, "-k", "3", "--dtype", "fp32")
    assert long.returncode == 0, long.stderr
    assert "cut to its first 2,464 of 5,013 characters" in long.stderr and "cut" not in short.stderr


def test_search_refuses_embeddings_of_another_model(embedded, tmp_path):
    _, out = embedded
    other = dinov2clip.make_tiny(str(tmp_path / "other"), seed=1)
    res = run("search", out, "a dog", "--model", other)
    assert res.returncode == 2
    assert "embedded with another model" in one_line(res.stderr)


@pytest.mark.parametrize("args,match", [
    (("info", "no-such-preset"), "unknown preset 'no-such-preset'"),
    (("info", "./missing-dir"), "model directory not found"),
    (("embed", "/no/such/images", "--out", "x.npz"), "no such file or directory"),
    (("search", "missing.npz", "q"), "embeddings file not found"),
])
def test_user_errors_exit_2_with_one_line(args, match, tmp_path):
    res = subprocess.run([str(EXE), *args], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2
    assert re.search(match, one_line(res.stderr))


def test_embed_out_never_clobbers_what_is_not_ours(tiny_dir, image_folder, tmp_path):
    """--out a folder, or a file that is not our embeddings: refused before any work, nothing written."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.npz").write_bytes(b"the user's own file")
    for out, match in ((tmp_path / "folder", "is a folder"), (tmp_path / "notes.npz", "refusing to overwrite")):
        res = run("embed", image_folder, "--model", tiny_dir, "--out", out)
        assert res.returncode == 2 and match in one_line(res.stderr)
    assert (tmp_path / "notes.npz").read_bytes() == b"the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "notes.npz"] and not any(
        (tmp_path / "folder").iterdir())


@pytest.mark.parametrize("k", ["-1", "0", "two"])
def test_search_k_must_be_positive(embedded, k):
    _, out = embedded
    res = run("search", out, "a dog", "-k", k)
    assert res.returncode == 2 and "argument -k:" in res.stderr and "Traceback" not in res.stderr


def test_a_broken_symlink_is_named_and_counted(tiny_dir, image_folder, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted(image_folder.iterdir())[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    res = run("embed", folder, "--model", tiny_dir, "--out", tmp_path / "e.npz", "--dtype", "fp32")
    assert res.returncode == 0, res.stderr
    assert "gone.jpg" in res.stderr and ", skipped " in res.stdout
    _, items, meta = load_embeddings(tmp_path / "e.npz")
    assert meta["skipped"] >= 1 and not any("gone.jpg" in i for i in items)


def test_misspelled_flag_fails_before_work(tiny_dir, image_folder, tmp_path):
    res = run("embed", image_folder, "--model", tiny_dir, "--out", tmp_path / "x.npz", "--bach-size", "4")
    assert res.returncode == 2 and "unrecognized arguments: --bach-size" in res.stderr
    assert not list(tmp_path.iterdir())


def test_unexpected_error_exit_1_with_logged_traceback(monkeypatch, capsys, tiny_dir):
    def boom(*_):
        raise RuntimeError("kaboom")

    monkeypatch.setattr("dinov2clip.embed.expand_images", boom)
    assert main(["embed", str(tiny_dir), "--out", "x.npz"]) == 1
    err = capsys.readouterr().err
    log = Path(re.search(r"traceback logged to (\S+)\)", err).group(1))
    assert "RuntimeError: kaboom" in err and "Traceback" not in err
    assert "Traceback" in log.read_text() and "kaboom" in log.read_text()


def test_make_tiny_and_info(tmp_path):
    res = run("make-tiny", tmp_path / "m", "--seed", "5")
    assert res.returncode == 0, res.stderr
    info = run("info", tmp_path / "m")
    fp = dinov2clip.load(str(tmp_path / "m"), image=False, text=False).fingerprint
    assert f"fingerprint {fp}" in info.stdout
    js = run("info", "reference", "--json")
    assert '"clip_pretrained"' not in js.stdout and '"ViT-B-16-quickgelu"' in js.stdout

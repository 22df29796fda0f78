"""`python -m training.run fit` and `quality`: a projector from unlabelled images, and its quality against the
CLIP teacher on the user's images. Real processes for the command line, real signals for resumption."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="fit's report has a plot (matplotlib: the [train] extra)")
from training import fit as fitmod  # noqa: E402
from training import quality as q  # noqa: E402
from training.synthetic import COLOURS, SHAPES, shape_image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shapes_folder(root: Path, n: int, seed: int = 0) -> Path:
    """n shape images in class folders named 'red circle' etc."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        colour, shape = list(COLOURS)[i % 6], SHAPES[(i // 6) % 3]
        folder = root / f"{colour} {shape}"
        folder.mkdir(parents=True, exist_ok=True)
        shape_image(rng, colour, shape).save(folder / f"{seed}-{i}.png")
    return root


def cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "training.run", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=600, **kw)


SMALL = ("--epochs", "3", "--hidden-dim", "32", "--num-blocks", "1", "--batch-size", "32", "--device", "cpu",
         "--dtype", "fp32", "--quiet")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = shapes_folder(tmp_path_factory.mktemp("fit-images"), 90)
    (root / "red circle" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "red circle" / "dangling.png").symlink_to(root / "missing.png")
    return root


@pytest.fixture(scope="module")
def fitted(folder, tiny_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("fit")
    env = {"DINOV2CLIP_CACHE": str(work / "cache")}
    res = cli("fit", folder, "--model", tiny_dir, "--out", work / "model", "--labels", "folder", "--template", "a {}",
              *SMALL, env=env)
    return res, work, env


def test_fit_writes_a_model_directory_with_provenance(fitted, folder):
    import dinov2clip

    res, work, _ = fitted
    assert res.returncode == 0, res.stderr
    model = dinov2clip.load(str(work / "model"), device="cpu", dtype="fp32")
    emb = model.encode_image([next((folder / "blue square").iterdir())])
    assert emb.shape == (1, model.embed_dim)
    record = model.config.provenance["fit"]
    assert record["counts"]["distinct"] == 91  # 90 images + the corrupt file (the dangling link has no content)
    assert record["counts"]["unreadable"] == 2 and record["counts"]["train"] + record["counts"]["val"] == 90
    assert len(record["image_manifest_sha256"]) == 64
    assert record["recipe"]["epochs"] == 3
    assert "held-out quality after" in res.stdout
    # both bad files are named, not only counted
    assert "corrupt.jpg" in res.stdout and "dangling.png" in res.stdout


def test_fit_starts_from_the_source_projector_and_reports_before_and_after(fitted, tiny_dir):
    res, work, _ = fitted
    import dinov2clip

    record = dinov2clip.load(str(work / "model"), image=False, text=False).config.provenance["fit"]
    assert record["init"] == str(tiny_dir)
    assert record["quality_held_out"]["before"] is not None
    assert "held-out quality before" in res.stdout


def test_rerun_encodes_nothing_again(fitted, folder, tiny_dir):
    res, work, env = fitted
    again = cli("fit", folder, "--model", tiny_dir, "--out", work / "model2", "--from-scratch", *SMALL, env=env)
    assert again.returncode == 0, again.stderr
    assert "0 encoded now" in again.stdout
    refused = cli("fit", folder, "--model", tiny_dir, "--out", work / "model", *SMALL, env=env)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr


@pytest.mark.parametrize("make, extra, expect", [
    (lambda p: p.mkdir(), [], "at least 10 distinct readable images"),
    (lambda p: None, [], "no such file or directory"),
    (lambda p: p.mkdir(), ["--epochs", "0"], "epochs, batch size and encode batch size must be ≥ 1"),
    (lambda p: p.mkdir(), ["--val-percent", "50"], "--val-percent must be between 0 and 50, got 50.0"),
])
def test_bad_input_is_one_line(tmp_path, tiny_dir, make, extra, expect):
    target = tmp_path / "in"
    make(target)
    res = cli("fit", target, "--model", tiny_dir, "--out", tmp_path / "m", *SMALL, *extra)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in res.stderr


def test_out_that_is_not_ours_is_never_touched(tmp_path, folder, tiny_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = cli("fit", folder, "--model", tiny_dir, "--out", out, "--overwrite", *SMALL)
    assert res.returncode == 2 and "not a dinov2clip model directory" in res.stderr
    assert (out / "notes.txt").read_text() == "keep me"


def _wait_for(predicate, proc, timeout=300):
    start = time.monotonic()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.05)


def test_killed_fit_resumes_without_re_encoding(tmp_path, tiny_dir):
    """SIGKILL once a first feature chunk is written, then once a first epoch is checkpointed: each rerun
    goes on from there (finished chunks are not encoded again; training resumes from its last epoch)."""
    images = shapes_folder(tmp_path / "images", 700, seed=3)
    train, _ = fitmod.split(fitmod.hash_images(fitmod.find_images([images])), 10.0)
    assert len(fitmod.chunks(train)) >= 2, "the test needs several chunks"
    env = {"DINOV2CLIP_CACHE": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "training.run", "fit", str(images), "--model", str(tiny_dir), "--out",
            str(tmp_path / "m"), "--from-scratch", "--epochs", "40", "--hidden-dim", "256", "--num-blocks", "4",
            "--batch-size", "16", "--device", "cpu", "--dtype", "fp32", "--encode-batch-size", "16", "--quiet"]
    features = tmp_path / "cache" / "fit" / "features"

    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(lambda: any(features.glob("*/shards/*/meta.json")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(features.glob("*/shards/*/meta.json")))
    assert 1 <= done < len(fitmod.chunks(train)) + 1

    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(lambda: any((tmp_path / "cache" / "fit" / "runs").glob("*/train/checkpoints/last.pt")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    res = subprocess.run(args, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "0 encoded now" in res.stdout  # everything was encoded by the second run
    assert "epoch 1/40" not in res.stdout  # training went on from the killed run's checkpoint
    assert "epoch 40/40" in res.stdout
    assert (tmp_path / "m" / "config.json").is_file()


# -- quality --------------------------------------------------------------------------------------

def test_teacher_against_itself_is_exactly_one():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(200, 16)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    text = rng.normal(size=(5, 16)).astype(np.float32)
    labels = rng.integers(0, 5, 200)
    report = q.compare(img, img, text, [f"q{i}" for i in range(5)], labels)
    assert report["teacher_agreement@10"] == 1.0 and report["teacher_agreement@50"] == 1.0
    assert report["rank_correlation"] == pytest.approx(1.0)
    assert report["zero_shot_accuracy"]["ratio"] == 1.0 and report["precision@10"]["ratio"] == 1.0


def test_metrics_against_known_values():
    spearmanr = pytest.importorskip("scipy.stats", reason="scipy checks the rank correlation").spearmanr

    teacher = np.array([[5.0, 4, 3, 2, 1, 0]])
    model = np.array([[5.0, 0, 4, 1, 3, 2]])  # top-2: {0, 2} vs the teacher's {0, 1}
    assert q.teacher_agreement(model, teacher, 2) == 0.5
    assert q.teacher_agreement(model, teacher, 3) == pytest.approx(2 / 3)
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 40)), rng.normal(size=(3, 40))
    a[:, :5] = 0.0  # ties share their mean rank
    want = np.mean([spearmanr(x, y).statistic for x, y in zip(a, b)])
    assert q.rank_correlation(a, b) == pytest.approx(want)
    labels = np.array([0, 1, 1, 0])
    scores = np.array([[0.9, 0.1, 0.2, 0.3], [0.1, 0.8, 0.1, 0.4]])
    assert q.zero_shot_accuracy(scores, labels) == 0.5  # images 2 and 3 go to the other class
    assert q.precision_at_k(scores, labels, 2) == pytest.approx((1.0 + 0.5) / 2)


def test_quality_command_writes_json_markdown_and_plot(fitted, folder, tmp_path):
    _, work, env = fitted
    res = cli("quality", folder, "--model", work / "model", "--out", tmp_path / "q", "--labels", "folder",
              "--template", "a {}", "--device", "cpu", "--dtype", "fp32", "--quiet", env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "q" / "quality.json").read_text())
    for key in ("teacher_agreement@10", "teacher_agreement@50"):
        assert 0.0 <= report[key] <= 1.0
    assert report["images"] == 90 and report["unreadable"] == 2 and report["encoded_now"] == 0
    assert set(report["zero_shot_accuracy"]) == {"model", "clip", "ratio"}
    assert (tmp_path / "q" / "quality.md").read_text().startswith("# Text search quality")
    assert (tmp_path / "q" / "quality.png").read_bytes()[:4] == b"\x89PNG"


def test_queries_file(tmp_path):
    path = tmp_path / "queries.txt"
    path.write_text("# my queries\na dog\n\n  a cat on a sofa  \n")
    assert q.read_queries(path) == ["a dog", "a cat on a sofa"]
    path.write_text("# nothing\n")
    with pytest.raises(Exception, match="no query"):
        q.read_queries(path)


def test_fit_reads_webdataset_shards_without_captions(tmp_path, tiny_dir):
    """Shards as img2dataset writes them, minus captions: their images split by content hash as files are, each
    shard cached as two chunks named by its bytes (a rerun encodes nothing); a corrupt image is counted."""
    from training.synthetic import write_shapes_shards

    shards = write_shapes_shards(tmp_path / "wds", 60, per_shard=30, seed=4, corrupt=1)
    for shard in shards:  # drop the captions: fit needs none
        import tarfile

        kept = tmp_path / "kept.tar"
        with tarfile.open(shard) as src, tarfile.open(kept, "w") as dst:
            for member in src.getmembers():
                if not member.name.endswith((".txt", ".json")):
                    dst.addfile(member, src.extractfile(member))
        kept.replace(shard)
    env = {"DINOV2CLIP_CACHE": str(tmp_path / "cache")}
    assert [p.name for p in shards] == ["shapes-00000.tar", "shapes-00001.tar"]
    spec = str(tmp_path / "wds" / "shapes-{00000..00001}.tar")  # a brace range, as for precompute
    res = cli("fit", spec, "--model", tiny_dir, "--out", tmp_path / "m", "--from-scratch", *SMALL, env=env)
    assert res.returncode == 0, res.stderr
    assert "fit: 59 images (" in res.stdout and "59 of them from 2 webdataset shards" in res.stdout
    assert "1 unreadable" in res.stdout
    record = json.loads((tmp_path / "m" / "config.json").read_text())["provenance"]["fit"]["counts"]
    assert record["train"] + record["val"] == 59 and record["val"] >= 1
    again = cli("fit", *map(str, shards), "--model", tiny_dir, "--out", tmp_path / "m2", "--from-scratch", *SMALL,
                env=env)
    assert again.returncode == 0 and "0 encoded now" in again.stdout, again.stderr


def test_quality_never_reads_another_models_features(folder, tiny_dir, tmp_path):
    """Two models over the same images share chunk names (they name images): each must read its own features."""
    import dinov2clip

    other = dinov2clip.make_tiny(str(tmp_path / "other"), seed=1)
    common = dict(device="cpu", dtype="fp32", progress=False, labels="folder", template="a {}")
    fitmod.quality([folder], str(tiny_dir), tmp_path / "q-tiny", cache=tmp_path / "shared", **common)
    shared = fitmod.quality([folder], str(other), tmp_path / "q-other", cache=tmp_path / "shared", **common)
    alone = fitmod.quality([folder], str(other), tmp_path / "q-alone", cache=tmp_path / "fresh", **common)
    for key in ("teacher_agreement@10", "teacher_agreement@50", "rank_correlation"):
        assert shared[key] == alone[key]
    assert shared["zero_shot_accuracy"] == alone["zero_shot_accuracy"]


def test_quality_never_overwrites_files_it_did_not_write(tmp_path):
    img = np.eye(4, dtype=np.float32)
    report = q.compare(img, img, img[:2], ["a", "b"])
    q.write_report(report, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "quality.json").read_text())["format"] == q.FORMAT
    q.write_report(report, tmp_path / "q")  # its own report is replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "quality.md").write_text("my notes")
    with pytest.raises(Exception, match="did not write"):
        q.write_report(report, mine)
    assert (mine / "quality.md").read_text() == "my notes" and not (mine / "quality.json").exists()

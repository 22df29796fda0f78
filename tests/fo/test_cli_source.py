"""`python -m fiftyone_dinov2clip` as users run it, and the repository as a remote zoo model source."""
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

# the clip-retrieval environment has no FiftyOne (and CI requires it in the main one: see conftest)
pytest.importorskip("fiftyone.zoo", reason="fiftyone is not installed (pip install '.[fiftyone]')")

import fiftyone as fo
import fiftyone.zoo as foz

from fiftyone_dinov2clip import cli
from support.devdb import free_port
from fiftyone_dinov2clip.zoo import DinoV2ClipModel

REPO = Path(__file__).resolve().parents[2]


def run(*args, timeout=600, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "fiftyone_dinov2clip", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=timeout, cwd=cwd)


def test_register_index_quickstart(tiny_dir, tmp_path, zoo_tiny):
    out = run("register", "cli-tiny", str(tiny_dir))
    assert out.returncode == 0 and out.stdout.strip() == "cli-tiny", out.stderr
    listed = run("list")
    assert f"cli-tiny\t{tiny_dir.resolve()}" in listed.stdout

    folder = tmp_path / "imgs"
    shutil.copytree(REPO / "examples" / "images", folder)
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    (folder / "gone.png").symlink_to(tmp_path / "deleted.png")  # a broken symlink: named and counted too
    name = f"cli-{os.getpid()}"
    out = run("quickstart", str(folder), "--model", "cli-tiny", "--dataset-name", name, "--query", "a red circle",
              "-k", "3", "--port", str(free_port()), "--no-wait")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "embedded 6 images, 2 unreadable (skipped)" in out.stdout
    assert "top 3 for 'a red circle':" in out.stdout and "FiftyOne App ready: http://" in out.stdout
    assert "broken.png" in out.stderr and "gone.png" in out.stderr
    ds = fo.load_dataset(name)
    assert {"dinov2clip", "dinov2"} <= set(ds.list_brain_runs())
    assert ds.get_brain_info("dinov2clip").config.model == "cli-tiny"
    # re-running embeds only the new image and rebuilds its own indexes; another model's runs are refused
    shutil.copy(REPO / "examples" / "images" / "red_circle.png", folder / "red_circle_copy.png")
    again = run("index", str(folder), "--dataset-name", name, "--model", "cli-tiny")
    assert again.returncode == 0 and "embedded 1 images" in again.stdout, again.stderr[-2000:]
    ds.reload()
    assert len(ds.load_brain_results("dinov2clip").sample_ids) == 7 and ds.list_brain_runs() == ["dinov2", "dinov2clip"]
    other = run("index", name, "--model", str(tiny_dir.parent / "tiny"), "--embeddings-field", "other",
                "--dinov2-field", "", "--dinov2-brain-key", "")
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "--overwrite" in other.stderr, other.stderr
    again = run("index", name, "--model", "cli-tiny", "--overwrite")
    assert again.returncode == 0 and "embedded 0 images" in again.stdout, again.stderr[-2000:]
    ds.delete()


@pytest.mark.parametrize("args, message", [
    (["index", "/nonexistent/folder"], "neither a folder of images nor a FiftyOne dataset"),
    (["index", "examples/images", "--model", "no-such-model"], "registered: "),
    (["register", "x", "/nonexistent/model"], "model directory not found"),
    (["unregister", "never-registered"], "no registered dinov2clip model"),
])
def test_user_errors_are_one_line(args, message, zoo_tiny):
    out = run(*args)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_committed_zoo_source_is_a_fresh_export(tmp_path):
    cli.export_source(tmp_path / "fiftyone_zoo", "https://github.com/dinov2clip/dinov2clip")
    committed = REPO / "fiftyone_zoo"
    names = sorted(p.name for p in committed.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "fiftyone_zoo").iterdir())
    for n in names:
        assert (committed / n).read_bytes() == (tmp_path / "fiftyone_zoo" / n).read_bytes(), \
            f"fiftyone_zoo/{n} is stale: python -m fiftyone_dinov2clip export-source fiftyone_zoo"


def test_derived_zoo_names_come_from_content(tiny_dir, tmp_path, monkeypatch):
    """`quickstart --model DIR` registers DIR under a name made of its folder and its fingerprint: a folder
    named `reference` never takes the preset's zoo name, two `.../train/model` folders never share one, and
    the same folder keeps its name."""
    import dinov2clip
    from fiftyone_dinov2clip import registry

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dir, tmp_path / "reference")
    other = dinov2clip.make_tiny(str(tmp_path / "b" / "train" / "model"), seed=1)
    shutil.copytree(tiny_dir, tmp_path / "a" / "train" / "model")
    names = [cli.ensure_model(spec) for spec in ("./reference", "a/train/model", str(other), "a/train/model")]
    presets = {registry.preset_zoo_name(p) for p in cli.PRESETS}
    assert not set(names) & presets, names
    assert names[0].startswith("dinov2clip-reference-") and names[1] != names[2] and names[1] == names[3], names
    # the same weights in another `.../train/model` (a copy; the demo trained again elsewhere): the same model, so
    # the same name, now pointing at the folder last given (it was refused: "already names another model")
    shutil.copytree(tiny_dir, tmp_path / "c" / "train" / "model")
    assert cli.ensure_model("c/train/model") == names[1]
    assert registry.spec(names[1])["source"] == str((tmp_path / "c" / "train" / "model").resolve())
    with pytest.raises(cli.UserError, match="both a preset and a path"):
        cli.ensure_model("reference")
    for name in names[:3]:
        registry.unregister(name)


def test_a_hub_model_is_asked_for_once_per_command_and_its_name_keeps_that_snapshot(tiny_dir, tmp_path, monkeypatch,
                                                                                      zoo_tiny):
    """`index --model hf-hub:org/repo` asks the hub once (it asked again at every resolution of the source),
    and registers the snapshot it got: later loads read those files, never the hub again."""
    import dinov2clip.factory as factory
    import fiftyone_dinov2clip as fod
    from fiftyone_dinov2clip import registry
    from testsupport import seed_hub_repo

    seed_hub_repo("acme/fo-tiny", {".": tiny_dir})
    asked, real = [], factory.hub_snapshot
    monkeypatch.setattr(factory, "hub_snapshot", lambda spec: asked.append(spec) or real(spec))
    folder = tmp_path / "imgs"
    shutil.copytree(REPO / "examples" / "images", folder)
    name = f"hub-{os.getpid()}"
    assert cli.main(["index", str(folder), "--dataset-name", name, "--model", "hf-hub:acme/fo-tiny"]) == 0
    assert asked == ["acme/fo-tiny"]
    zoo_name = fo.load_dataset(name).get_brain_info("dinov2clip").config.model
    assert zoo_name.startswith("dinov2clip-fo-tiny-"), zoo_name
    assert registry.spec(zoo_name)["source"] == str(real("acme/fo-tiny").resolve())
    asked.clear()
    assert len(fod.sort_by_text(fo.load_dataset(name), "a red circle", k=2)) == 2 and asked == []
    fo.delete_dataset(name)
    registry.unregister(zoo_name)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_source_never_deletes_what_it_did_not_write(tmp_path):
    """A folder of the user's, the working directory, a file and a sibling named like our old scratch
    folder all survive, each refused in one line; an earlier export is replaced, and re-exporting gives
    the same bytes."""
    work = tmp_path / "work"
    (work / "mine").mkdir(parents=True)
    (work / "mine" / "notes.txt").write_text("keep me")
    (work / ".export-tmp").mkdir()
    (work / ".export-tmp" / "keep.txt").write_text("keep me too")
    (work / "file.txt").write_text("a file")
    before = _tree(work)
    for target, message in (("mine", "holds files dinov2clip did not write"),
                            (".", "holds files dinov2clip did not write"),
                            ("file.txt", "is not a directory")):
        out = run("export-source", target, cwd=work)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
        assert _tree(work) == before, f"export-source {target} changed the user's files"
    assert sorted(p.name for p in work.iterdir()) == [".export-tmp", "file.txt", "mine"], "temporaries left behind"

    out = run("export-source", "zoo", cwd=work)
    assert out.returncode == 0 and out.stdout.split() == ["dinov2clip-reference"], out.stderr
    first = _tree(work / "zoo")
    assert set(first) == {"manifest.json", "__init__.py"}  # no model files: a preset downloads on first use
    (work / "zoo" / "dinov2clip-reference.json").write_text("{}")  # as an older release exported it
    out = run("export-source", "zoo", cwd=work)  # an earlier export is ours to replace
    assert out.returncode == 0 and _tree(work / "zoo") == first, out.stderr
    (work / "zoo" / "extra.txt").write_text("added by the user")
    out = run("export-source", "zoo", cwd=work)
    assert out.returncode == 2 and "did not write" in out.stderr
    assert (work / "zoo" / "extra.txt").read_text() == "added by the user"
    assert {k: v for k, v in _tree(work).items() if not k.startswith("zoo/")} == before


def test_repository_registers_as_a_remote_zoo_source(tmp_path, monkeypatch):
    """FiftyOne's own `register_zoo_model_source` on an archive of the repository (GitHub serves the
    same zip): it finds fiftyone_zoo/manifest.json; a preset's first load downloads it (FiftyOne calls our
    `download_model`) into a model directory under the zoo directory, which then loads with no hub cache."""
    import numpy as np
    import torch

    import dinov2clip
    from dinov2clip.presets import REFERENCE_URL
    from dinov2clip.sources import url_cache_path
    from testsupport import seed_reference_towers, solid

    monkeypatch.setattr(fo.config, "model_zoo_dir", str(tmp_path / "zoo"))
    seed_reference_towers(tmp_path / "seed")
    ckpt = url_cache_path(REFERENCE_URL)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dinov2clip.ProjectorWithResiduals(768, 512, 2048, 6).state_dict(), ckpt)
    archive = tmp_path / "www" / "dinov2clip-main.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        for path in [REPO / "fiftyone.yml", *sorted((REPO / "fiftyone_zoo").iterdir())]:
            if path.is_file():
                z.write(path, f"dinov2clip-main/{path.relative_to(REPO)}")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(archive.parent), **k)  # noqa
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{archive.name}"
    try:
        foz.register_zoo_model_source(url)
        assert url in foz.list_zoo_model_sources()
        assert "dinov2clip-reference" in foz.list_zoo_models(source=url)
        assert not foz.is_zoo_model_downloaded("dinov2clip-reference")
        model = foz.load_zoo_model("dinov2clip-reference", cache=False)
        folder = tmp_path / "zoo" / "dinov2clip-remote" / "dinov2clip-reference"
        assert isinstance(model, DinoV2ClipModel) and model.config.source == str(folder)
        assert model.config.zoo_name == "dinov2clip-reference"
        assert {"config.json", "projector.safetensors", "dinov2", "clip"} <= {p.name for p in folder.iterdir()}
        assert foz.is_zoo_model_downloaded("dinov2clip-reference")
        ckpt.unlink()
        for repo in ("facebook--dinov2-base", "timm--vit_base_patch16_clip_224.openai"):  # the bundle needs neither
            shutil.rmtree(Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo}")
        with model:
            assert np.asarray(model.embed(np.asarray(solid("red")))).shape == (512,)
        foz.delete_zoo_model_source(url)
        assert url not in foz.list_zoo_model_sources()
    finally:
        server.shutdown()
        ckpt.unlink(missing_ok=True)


def test_a_killed_index_resumes_embedding_each_image_once(tiny_dir, tmp_path, zoo_tiny):
    """SIGKILL mid-embedding (after 2 of 5 batches were written), then the same command: it finishes,
    embedding only the images the killed run had not, and the index holds every image."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    name = f"kill-{os.getpid()}"
    args = ["index", str(folder), "--dataset-name", name, "--model", zoo_tiny, "--batch-size", "4"]
    killer = f"""
import os, signal, sys
import dinov2clip.model as m
real, calls = m.DinoV2Clip.encode_image, [0]
def encode_image(self, *a, **k):
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *a, **k)
m.DinoV2Clip.encode_image = encode_image
from fiftyone_dinov2clip.cli import main
sys.exit(main({args!r}))
"""
    killed = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, timeout=600, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ds = fo.load_dataset(name)
    assert len(ds.exists("dinov2clip")) == 8 and "dinov2clip" not in ds.list_brain_runs()
    again = run(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "embedded 12 images" in again.stdout
    ds.reload()
    assert len(ds.exists("dinov2clip")) == 20 and len(ds.load_brain_results("dinov2clip").sample_ids) == 20
    ds.delete()


def test_concurrent_registrations_all_land(tiny_dir):
    """Two real processes registering ten names each at once: all twenty are registered (none lost to a
    read-modify-write race, no crash on a shared temporary file)."""
    code = ("import sys; from fiftyone_dinov2clip import registry\n"
            "for i in range(10): registry.register(f'race-{sys.argv[1]}-{i}', sys.argv[2])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, tag, str(tiny_dir)], stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    from fiftyone_dinov2clip import registry

    names = {n for n in registry.registered() if n.startswith("race-")}
    assert names == {f"race-{t}-{i}" for t in "ab" for i in range(10)}
    for n in names:
        registry.unregister(n)


def test_two_indexes_of_one_folder_at_once_both_succeed(tmp_path, zoo_tiny):
    folder = tmp_path / "same"
    shutil.copytree(REPO / "examples" / "images", folder)
    name = f"twice-{os.getpid()}"
    args = [sys.executable, "-m", "fiftyone_dinov2clip", "index", str(folder), "--dataset-name", name,
            "--model", zoo_tiny]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    embedded = sorted(int(re.search(r"embedded (\d+) images", o[0]).group(1)) for o in outs)
    assert embedded == [0, 6], outs  # one waited for the other, then found everything embedded
    ds = fo.load_dataset(name)
    assert len(ds) == 6 and len(ds.load_brain_results("dinov2clip").sample_ids) == 6
    ds.delete()

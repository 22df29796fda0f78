"""The eval stage end to end with the tiny model: loaders, bad input, skip-missing, cache, extra rows,
the teacher check, the written files, and parity with CLIP_benchmark's own evaluate()."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2clip import UserError, identity
from dinov2clip.atomic import write_json_atomic
from dinov2clip.config import ModelConfig, read_config
from dinov2clip.modeldir import save_model_dir
from dinov2clip.preprocess import load_rgb
from dinov2clip.projector import ProjectorWithResiduals
from training.datasets import load_folder, load_karpathy
from training.evaluate import TeacherCheckWarning, evaluate
from training.metrics import retrieval_recall
from training.report import check_teacher, plot_values
from training.run import main

ROOT = Path(__file__).resolve().parents[1]
N_TEST = 9  # test images, with 1, 2, 3, 1, 2, 3... captions: 18 captions
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="the eval stage plots with matplotlib (the [train] extra)")


def write_karpathy(root: Path, n_test: int = N_TEST, n_val: int = 3, dataset: str = "coco") -> Path:
    """A Karpathy-format file over generated images under root/val2014 (filepath 'val2014')."""
    rng = np.random.default_rng(0)
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n_test + n_val):
        arr = rng.integers(0, 256, (36 + 4 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "val2014" / f"img{i}.jpg")
        items.append({"filepath": "val2014", "filename": f"img{i}.jpg", "imgid": i,
                      "split": "test" if i < n_test else "val",
                      "sentences": [{"raw": f"a photo {i} of thing {j}", "tokens": ["a", "photo"]}
                                    for j in range(1 + i % 3)]})
    path = root / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"dataset": dataset, "images": items}))
    return path


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory):
    root = tmp_path_factory.mktemp("karpathy")
    return write_karpathy(root), root


def run_eval(tiny_dir, karpathy, out, **kwargs):
    file, root = karpathy
    kwargs.setdefault("cache_dir", False)
    return evaluate(str(tiny_dir), [load_karpathy(file, root)], out, dtype="fp32", device="cpu", progress=False,
                    **kwargs)


@pytest.fixture(scope="module")
def report(tiny_dir, karpathy, tmp_path_factory):
    return run_eval(tiny_dir, karpathy, tmp_path_factory.mktemp("out"))


# -- loaders ------------------------------------------------------------------------------------------

def test_karpathy_test_split_by_default(karpathy):
    file, root = karpathy
    ds = load_karpathy(file, root)
    assert (ds.name, ds.display_name, ds.split) == ("coco", "MSCOCO", "test")
    assert [p.name for p in ds.images] == [f"img{i}.jpg" for i in range(N_TEST)]
    assert len(ds.captions) == 18 and ds.captions[:3] == ["a photo 0 of thing 0", "a photo 1 of thing 0",
                                                           "a photo 1 of thing 1"]
    assert ds.text_image_ids[:6] == [0, 1, 1, 2, 2, 2]
    assert ds.entries[1] == "images[1] img1.jpg" and len(ds.annotation_sha256) == 64


def test_karpathy_other_splits_and_image_root_layouts(karpathy):
    file, root = karpathy
    val = load_karpathy(file, root, split="val")
    assert [p.name for p in val.images] == ["img9.jpg", "img10.jpg", "img11.jpg"]
    both = load_karpathy(file, root / "val2014", split="test+val")  # root given as the images' own folder
    assert len(both.images) == N_TEST + 3 and all(p.is_file() for p in both.images)


def test_folder_with_captions_in_each_format(karpathy, tmp_path):
    _, root = karpathy
    folder = root / "val2014"
    files = {
        "caps.csv": "image,caption\nimg0.jpg,a red thing\nimg1.jpg,\"a blue, round thing\"\nimg0.jpg,another\n",
        "caps.tsv": "filename\ttext\nimg0.jpg\ta red thing\nimg1.jpg\ta blue, round thing\nimg0.jpg\tanother\n",
        "caps.json": json.dumps({"img0.jpg": ["a red thing", "another"], "img1.jpg": "a blue, round thing"}),
        "caps.jsonl": "\n".join(json.dumps(o) for o in [{"image": "img0.jpg", "captions": ["a red thing", "another"]},
                                                         {"file_name": "img1.jpg", "caption": "a blue, round thing"}]),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        ds = load_folder(folder, tmp_path / name)
        assert [p.name for p in ds.images] == ["img0.jpg", "img1.jpg"], name
        assert sorted(zip(ds.text_image_ids, ds.captions)) == [(0, "a red thing"), (0, "another"),
                                                               (1, "a blue, round thing")], name
        assert (ds.kind, ds.name, ds.split) == ("folder", "val2014", None)


# -- bad input: one line naming the file and entry ----------------------------------------------------

def _karpathy_variant(tmp_path, karpathy, edit) -> Path:
    file, _ = karpathy
    data = json.loads(file.read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


BAD_KARPATHY = {
    "not json": (lambda p: p.write_text("{not json"), r"edited.json: not valid JSON \(.* at line 1"),
    "no images list": (lambda p: p.write_text(json.dumps({"annotations": []})),
                       r"edited.json: not a Karpathy caption file \(expected an object with an 'images' list"),
    "entry without sentences": ("images", 4, "sentences", None,
                                r"edited.json: images\[4\] is not in Karpathy format: missing or invalid 'sentences'"),
    "sentence without raw": ("sentence", 2, None, None, r"images\[2\] is not in Karpathy format: sentences\[0\] has "
                                                        r"no 'raw' text"),
    "missing image": ("images", 3, "filename", "gone.jpg",
                      r"edited.json: images\[3\] gone.jpg: image not found: .*gone.jpg; pass --skip-missing"),
}


def _make_bad(tmp_path, karpathy, case):
    if callable(case[0]):
        path = tmp_path / "edited.json"
        case[0](path)
        return path, case[1]
    what, index, key, value, message = case

    def edit(data):
        if what == "sentence":
            data["images"][index]["sentences"][0] = {"tokens": None}
        elif value is None:
            del data["images"][index][key]
        else:
            data["images"][index][key] = value
    return _karpathy_variant(tmp_path, karpathy, edit), message


@pytest.mark.parametrize("name", list(BAD_KARPATHY))
def test_bad_karpathy_files_fail_with_one_line(name, karpathy, tmp_path, capsys):
    path, message = _make_bad(tmp_path, karpathy, BAD_KARPATHY[name])
    with pytest.raises(UserError, match=message):
        load_karpathy(path, karpathy[1])
    code = main(["eval", "--karpathy", str(path), "--images", str(karpathy[1]), "--out", str(tmp_path / "o"),
                 "--model", "/nonexistent-model-dir"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(message, err[0]), err
    assert err[0].startswith("python -m training.run: error: ")


@pytest.mark.parametrize("split, message", [
    ("train", r"no images in split 'train' \(splits present: test, val\)"),
    ("", r"no images in split ''"),
])
def test_empty_split_names_the_splits_present(split, message, karpathy):
    with pytest.raises(UserError, match=message):
        load_karpathy(*karpathy, split=split)


@pytest.mark.parametrize("text, message", [
    ("name,caption\na.jpg,x\n", r"caps.csv: no image column \(one of image, filename"),
    ("image,caption\n", r"caps.csv: no captions"),
    ("image,caption\nnot-there.jpg,x\n", r"caps.csv: not-there.jpg: image not found"),
])
def test_bad_folder_captions(text, message, karpathy, tmp_path):
    (tmp_path / "caps.csv").write_text(text)
    with pytest.raises(UserError, match=message):
        load_folder(karpathy[1] / "val2014", tmp_path / "caps.csv")


def test_cli_usage_errors_are_one_line(karpathy, tmp_path, capsys):
    file, root = karpathy
    assert main(["eval", "--karpathy", str(file), "--out", str(tmp_path)]) == 2
    assert "give one --images ROOT per --karpathy FILE (got 1 and 0)" in capsys.readouterr().err
    assert main(["eval", "--out", str(tmp_path), "--model", "/nonexistent-model-dir"]) == 2
    assert "no dataset to evaluate" in capsys.readouterr().err  # checked before the model loads
    with pytest.raises(SystemExit) as e:
        main(["eval", "--karpathy", str(file), "--images", str(root), "--out", str(tmp_path), "--chekpoint", "x"])
    assert e.value.code == 2


@needs_matplotlib
def test_skip_missing_skips_and_counts(tiny_dir, karpathy, tmp_path):
    file, root = karpathy
    images = tmp_path / "images"
    shutil.copytree(root / "val2014", images / "val2014")
    (images / "val2014" / "img1.jpg").unlink()  # 2 captions
    (images / "val2014" / "img2.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")  # 3 captions
    with pytest.raises(UserError, match=r"images\[1\] img1.jpg: image not found.*--skip-missing"):
        load_karpathy(file, images)
    ds = load_karpathy(file, images, skip_missing=True)
    with pytest.raises(UserError, match=r"images\[2\] img2.jpg: cannot read image .*img2.jpg.*--skip-missing"):
        evaluate(str(tiny_dir), [ds], tmp_path / "o", dtype="fp32", cache_dir=False, progress=False)
    report = evaluate(str(tiny_dir), [ds], tmp_path / "out", dtype="fp32", cache_dir=False, progress=False,
                      skip_missing=True)
    (summary,) = report["datasets"]
    assert (summary["images"], summary["captions"]) == (N_TEST - 2, 18 - 5)
    assert (summary["skipped_images"], summary["skipped_captions"]) == (2, 5)
    reasons = {s["entry"]: s["reason"] for s in summary["skipped"]}
    assert reasons["images[1] img1.jpg"] == "missing" and reasons["images[2] img2.jpg"].startswith("unreadable: ")
    assert "MSCOCO: 2 images with their 5 captions" in (tmp_path / "out" / "results.md").read_text()


# -- the report --------------------------------------------------------------------------------------

@needs_matplotlib
def test_report_records_what_was_measured(report, tiny_dir, tiny_model, karpathy):
    assert report["format"] == "dinov2clip-eval/1"
    assert report["model"]["fingerprint"] == tiny_model.fingerprint
    assert report["model"]["projector_sha256"] == tiny_model.config.projector["tensor_sha256"]
    assert report["settings"]["ks"] == [1, 5, 10] and report["settings"]["split"] == "test"
    assert report["settings"]["dtype"] == "float32" and report["settings"]["device"] == "cpu"
    assert "pessimistic" in report["settings"]["tie_policy"]
    assert report["code_version"]["dinov2clip"] and report["code_version"]["pipeline"] >= 1
    (ds,) = report["datasets"]
    assert ds["annotation_sha256"] == load_karpathy(*karpathy).annotation_sha256
    assert (ds["images"], ds["captions"], ds["skipped_images"], ds["split"]) == (N_TEST, 18, 0, "test")
    assert [r["name"] for r in report["rows"]] == ["dinov2clip", "CLIP"]
    for row in report["rows"]:
        recalls = row["recalls"]["coco"]
        assert set(recalls) == {f"{p}_recall@{k}" for p in ("image_retrieval", "text_retrieval") for k in (1, 5, 10)}
        assert all(0 <= v <= 1 for v in recalls.values())
    ours, clip = (r["recalls"]["coco"] for r in report["rows"])
    for key, pct in report["rows"][0]["percent_of_clip"]["coco"].items():
        assert pct == (pytest.approx(100 * ours[key] / clip[key]) if clip[key] else None)
    assert report["teacher_check"] == [] and report["warnings"] == []  # a random teacher: nothing published


@needs_matplotlib
def test_model_row_equals_the_metric_on_the_public_api(report, tiny_model, karpathy):
    ds = load_karpathy(*karpathy)
    expected = retrieval_recall(tiny_model.encode_image([str(p) for p in ds.images]),
                                tiny_model.encode_text(ds.captions), ds.text_image_ids)
    assert report["rows"][0]["recalls"]["coco"] == expected


@needs_matplotlib
def test_table_and_plot_match_the_json(report):
    out = Path(report["files"]["json"]).parent
    assert json.loads((out / "results.json").read_text())["rows"] == report["rows"]
    table = (out / "results.md").read_text()
    assert "K = 1, 5, 10" in table
    body = [line for line in table.splitlines() if line.startswith("| MSCOCO (9 images, 18 captions)")]
    assert len(body) == 6
    ours, clip = report["rows"]
    for line in body:
        _, direction, k, a, b, pct = [c.strip() for c in line.strip("|").split("|")]
        key = f"{'image' if direction == 'text→image' else 'text'}_retrieval_recall@{k}"
        assert a == f"{100 * ours['recalls']['coco'][key]:.2f}" and b == f"{100 * clip['recalls']['coco'][key]:.2f}"
        expected = ours["percent_of_clip"]["coco"][key]
        assert pct == ("n/a" if expected is None else f"{expected:.2f}")
    with Image.open(out / "recalls.png") as png:
        assert png.size[0] > 300 and json.loads(png.text["Description"]) == plot_values(report)
    assert plot_values(report)["coco"]["CLIP"] == clip["recalls"]["coco"]


@needs_matplotlib
def test_cli_end_to_end(tiny_dir, karpathy, tmp_path, report):
    file, root = karpathy
    res = subprocess.run([sys.executable, "-m", "training.run", "eval", "--model", str(tiny_dir), "--karpathy",
                          str(file), "--images", str(root), "--out", str(tmp_path / "out"), "--dtype", "fp32",
                          "--device", "cpu", "--no-cache", "--quiet"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "| MSCOCO (9 images, 18 captions) | text→image | 5 |" in res.stdout
    assert "wrote results.json, results.md, recalls.png" in res.stdout
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["recalls"] for r in written["rows"]] == [r["recalls"] for r in report["rows"]]


# -- parity with CLIP_benchmark's own evaluate() ------------------------------------------------------

class _Pairs(torch.utils.data.Dataset):
    def __init__(self, ds, transform):
        self.ds, self.transform = ds, transform

    def __len__(self):
        return len(self.ds.images)

    def __getitem__(self, i):
        captions = [c for c, j in zip(self.ds.captions, self.ds.text_image_ids) if j == i]
        return self.transform(load_rgb(self.ds.images[i])), captions


def _collate(batch):  # CLIP_benchmark's image_captions_collate_fn
    images, texts = zip(*batch)
    return torch.stack(images), list(texts)


class _Wrapped(torch.nn.Module):
    def __init__(self, encode_image, encode_text):
        super().__init__()
        self.encode_image, self.encode_text = encode_image, encode_text


@needs_matplotlib
def test_parity_with_clip_benchmark_end_to_end(tiny_dir, karpathy, tmp_path):
    """CLIP_benchmark's zeroshot_retrieval.evaluate over the same generated Karpathy set, with our model
    and the teacher wrapped as encode_image/encode_text, gives our eval's recalls. (test+val: 12 images,
    as CLIP_benchmark's top-k cannot take K = 10 over fewer images.)"""
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    from training.encode import load_models

    ds = load_karpathy(*karpathy, split="test+val")
    report = evaluate(str(tiny_dir), [ds], tmp_path, dtype="fp32", device="cpu", cache_dir=False, progress=False)
    model = load_models(str(tiny_dir), device="cpu", dtype="fp32")
    ours = _Wrapped(lambda x: model.project(model.encode_dinov2(x)), model.text_encoder)
    teacher = _Wrapped(model.teacher.encode_image, model.teacher.encode_text)  # open_clip's stock towers
    for row, wrapped, transform in ((report["rows"][0], ours, model.preprocess),
                                    (report["rows"][1], teacher, model.teacher_transform)):
        loader = torch.utils.data.DataLoader(_Pairs(ds, transform), batch_size=4, collate_fn=_collate)
        theirs = zr.evaluate(wrapped, loader, model.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
        assert theirs.keys() == row["recalls"]["coco"].keys()
        for key, value in row["recalls"]["coco"].items():
            n = len(ds.captions) if key.startswith("image_retrieval") else len(ds.images)
            assert round(theirs[key] * n) == round(value * n), (row["name"], key)
        assert 0 < row["recalls"]["coco"]["image_retrieval_recall@5"] < 1  # neither trivially 0 nor 1


# -- cache -------------------------------------------------------------------------------------------

def _other_projector_dir(tiny_dir, out: Path, seed: int) -> Path:
    """The tiny model with another projector: same DINOv2, same CLIP."""
    config = read_config(tiny_dir)
    torch.manual_seed(seed)
    p = config.projector
    projector = ProjectorWithResiduals(p["input_dim"], p["output_dim"], p["hidden_dim"], p["num_blocks"])

    def copy_parts(tmp, cfg):
        for part in ("dinov2", "clip"):
            shutil.copytree(tiny_dir / part, tmp / part)
    return save_model_dir(config, projector, out, extra=copy_parts)


@needs_matplotlib
def test_cache_reuses_features_for_another_projector_never_stale_ones(tiny_dir, karpathy, tmp_path, report):
    file, root = karpathy
    images = tmp_path / "images"
    shutil.copytree(root, images)
    data = (images, images / file.name)
    cache = tmp_path / "cache"

    def status(model_dir, dtype="fp32", split="test"):
        r = evaluate(str(model_dir), [load_karpathy(data[1], data[0], split=split)], tmp_path / "o",
                     cache_dir=cache, progress=False, device="cpu", dtype=dtype)
        return r["datasets"][0]["cache"], r["rows"][0]["recalls"]

    first, recalls = status(tiny_dir)
    assert first == {"dinov2": "miss", "teacher": "miss", "text": "miss"}
    assert recalls == report["rows"][0]["recalls"]  # cached or not, the same numbers
    assert status(tiny_dir) == ({"dinov2": "hit", "teacher": "hit", "text": "hit"}, recalls)

    other_cache, other_recalls = status(_other_projector_dir(tiny_dir, tmp_path / "other", seed=1))
    assert other_cache == {"dinov2": "hit", "teacher": "hit", "text": "hit"} and other_recalls != recalls

    assert status(tiny_dir, dtype="bf16")[0] == {"dinov2": "miss", "teacher": "miss", "text": "miss"}
    assert status(tiny_dir, split="val")[0] == {"dinov2": "miss", "teacher": "miss", "text": "miss"}
    Image.new("RGB", (50, 40), "red").save(images / "val2014" / "img0.jpg")  # an image changes on disk
    assert status(tiny_dir)[0] == {"dinov2": "miss", "teacher": "miss", "text": "hit"}


# -- rows without re-encoding ------------------------------------------------------------------------

@needs_matplotlib
def test_checkpoints_weight_averages_and_ensembles(tiny_dir, karpathy, tmp_path, report):
    from safetensors.torch import load_file

    own = load_file(str(tiny_dir / "projector.safetensors"))
    torch.save({"model": own, "epoch": 1}, tmp_path / "run_epoch_1.pt")  # the model's own projector
    other = _other_projector_dir(tiny_dir, tmp_path / "run_epoch_2", seed=2)
    ckpts = [str(tmp_path / "run_epoch_1.pt"), str(other)]
    r = run_eval(tiny_dir, karpathy, tmp_path / "out", checkpoints=ckpts, weight_averages=[[ckpts[0], ckpts[0]]],
                 ensembles=[["model", "model"], ["model", "clip"]])
    rows = {row["name"]: row for row in r["rows"]}
    assert list(rows) == ["dinov2clip", "CLIP", "run_epoch_1", "run_epoch_2", "wavg(run_epoch_1, run_epoch_1)",
                          "ens(model, model)", "ens(model, clip)"]
    model = rows["dinov2clip"]["recalls"]
    assert rows["run_epoch_1"]["recalls"] == model and rows["run_epoch_1"]["epoch"] == 1
    assert rows["wavg(run_epoch_1, run_epoch_1)"]["recalls"] == model
    assert rows["ens(model, model)"]["recalls"] == model
    assert rows["run_epoch_2"]["recalls"] != model and rows["run_epoch_2"]["epoch"] == 2

    from training.encode import load_models
    models = load_models(str(tiny_dir), device="cpu", dtype="fp32")
    ds = load_karpathy(*karpathy)
    ours = models.encode_image([str(p) for p in ds.images])
    theirs = torch.cat([models.encode_teacher(torch.stack([models.teacher_transform(load_rgb(p))]))
                        for p in ds.images])
    mixed = torch.nn.functional.normalize(ours + theirs, dim=-1)
    assert rows["ens(model, clip)"]["recalls"]["coco"] == retrieval_recall(
        mixed, models.encode_text(ds.captions), ds.text_image_ids)
    assert r["selection"]["best"] in ("run_epoch_1", "run_epoch_2") and r["selection"]["split"] == "test"
    table = Path(r["files"]["table"]).read_text()
    assert "## All rows" in table and "| ens(model, clip) |" in table and "select on `--split val`" in table
    with Image.open(r["files"]["plot"]) as png:
        assert set(json.loads(png.text["Description"])["coco"]) == set(rows)


@needs_matplotlib
def test_eval_replaces_its_own_report_and_never_a_file_it_did_not_write(tiny_dir, karpathy, tmp_path):
    """`--out` holding a results.md of the user's was overwritten after the whole evaluation; now it is refused
    before any image is embedded (nothing reaches the cache), and a rerun into its own folder still replaces."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my notes")
    with pytest.raises(UserError, match=r"mine holds results.json, results.md, recalls.png that dinov2clip did not"):
        run_eval(tiny_dir, karpathy, mine, cache_dir=tmp_path / "cache")
    assert [p.name for p in mine.iterdir()] == ["results.md"] and (mine / "results.md").read_text() == "my notes"
    assert not (tmp_path / "cache").exists()
    first = run_eval(tiny_dir, karpathy, tmp_path / "ours")
    again = run_eval(tiny_dir, karpathy, tmp_path / "ours")
    assert again["files"] == first["files"] and again["rows"] == first["rows"]
    with pytest.raises(UserError, match="is a file: give a folder"):
        run_eval(tiny_dir, karpathy, mine / "results.md")


@needs_matplotlib
def test_incomparable_checkpoints_are_refused_before_embedding(tiny_dir, karpathy, tmp_path):
    import dinov2clip

    foreign = dinov2clip.make_tiny(str(tmp_path / "foreign"), seed=5)  # another DINOv2
    with pytest.raises(UserError, match=r"foreign: built on sha256:\w+ mean \+ .*, the evaluated model on"):
        run_eval(tiny_dir, karpathy, tmp_path / "o", checkpoints=[str(foreign)])
    torch.save(ProjectorWithResiduals(16, 32, 64, 2).state_dict(), tmp_path / "small.pt")
    with pytest.raises(UserError, match=r"small.pt: projector maps 16→32, the evaluated model's 32→32"):
        run_eval(tiny_dir, karpathy, tmp_path / "o", ensembles=[["model", str(tmp_path / "small.pt")]])
    with pytest.raises(UserError, match="--weight-average needs at least two"):
        run_eval(tiny_dir, karpathy, tmp_path / "o", weight_averages=[[str(foreign)]])
    assert not (tmp_path / "o").exists()


# -- the teacher against published figures -----------------------------------------------------------

@pytest.mark.parametrize("clip, dataset, t2i, ok", [
    ({"model_name": "ViT-B-16-quickgelu", "pretrained": "openai"}, "coco", 0.584, True),
    ({"model_name": "ViT-B-16-quickgelu", "pretrained": "openai", "origin": "ViT-B-16-quickgelu/openai"},
     "flickr30k", 0.835, False),
    ({"model_name": "ViT-B-32-quickgelu", "pretrained": "openai"}, "coco", 0.5585, True),
    ({"model_name": "ViT-B-16-quickgelu", "pretrained": "laion2b_s34b_b88k"}, "coco", 0.1, None),
    ({"model_name": "ViT-B-16-quickgelu", "pretrained": "openai"}, "flickr8k", 0.1, None),
])
def test_teacher_check_against_published_r5(clip, dataset, t2i, ok, karpathy, tmp_path):
    file = write_karpathy(tmp_path, n_test=2, n_val=0, dataset=dataset)
    ds = load_karpathy(file, tmp_path)
    checks = check_teacher(clip, ds, {"image_retrieval_recall@5": t2i, "text_retrieval_recall@5": 0.77})
    if ok is None:
        assert checks == []
    else:
        assert checks[0]["ok"] is ok and checks[0]["direction"] == "text→image"
        assert [c["metric"] for c in checks] == ["image_retrieval_recall@5", "text_retrieval_recall@5"]
    val = load_karpathy(write_karpathy(tmp_path / "v", n_test=1, n_val=1, dataset=dataset), tmp_path / "v",
                        split="val")
    assert check_teacher(clip, val, {"image_retrieval_recall@5": 0, "text_retrieval_recall@5": 0}) == []


@needs_matplotlib
def test_teacher_off_its_published_figure_warns(tiny_dir, karpathy, tmp_path, capsys):
    """A model directory whose bundled CLIP claims to be OpenAI ViT-B/16: the random teacher's R@5 on
    18 captions is a multiple of 5.56 points, never within 1 point of the published 58.37."""
    claimed = tmp_path / "claimed"
    shutil.copytree(tiny_dir, claimed)
    config = json.loads((claimed / "config.json").read_text())
    config["clip"]["origin"] = "ViT-B-16-quickgelu/openai"
    # the projector, re-declared as trained for the encoders claimed (else the pairing is refused)
    config["projector"]["encoder_fingerprint"] = identity.encoders(ModelConfig.from_dict(config))
    write_json_atomic(claimed / "config.json", config)
    with pytest.warns(TeacherCheckWarning) as caught:
        r = run_eval(claimed, karpathy, tmp_path / "out")
    assert any(re.match(r"teacher text→image R@5 on coco test is .* published 58.37", str(w.message)) for w in caught)
    assert any("text→image R@5" in w for w in r["warnings"])
    assert {c["published"] for c in r["teacher_check"]} == {58.37, 76.82}
    assert "**Warnings**" in Path(r["files"]["table"]).read_text()
    file, root = karpathy
    assert main(["eval", "--model", str(claimed), "--karpathy", str(file), "--images", str(root), "--out",
                 str(tmp_path / "cli"), "--dtype", "fp32", "--no-cache", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "python -m training.run: warning: teacher text→image R@5 on coco test" in err


def test_repeated_sets_are_named_apart(karpathy):
    """The same file given twice (eval's --karpathy, train's --val-karpathy) keys two results, not one."""
    from training.datasets import name_uniquely

    file, root = karpathy
    names = [ds.name for ds in name_uniquely([load_karpathy(file, root) for _ in range(3)])]
    assert names == ["coco", "coco-2", "coco-3"]

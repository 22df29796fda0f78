"""Issue 24, "right answers or none", in the core package: a model directory cannot make push upload files
outside it, loaded weights do not change when their files do, edited files are refused, nothing from a model
directory runs as code, and failures are one readable line."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dinov2clip
from dinov2clip import UserError, identity
from dinov2clip.config import CONFIG_FILE, file_sha256
from dinov2clip.hub import push, upload_files


@pytest.fixture
def copy_of_tiny(tiny_dir, tmp_path):
    return Path(shutil.copytree(tiny_dir, tmp_path / "tiny"))


def edit_json(path: Path, edit) -> None:
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


# -- 1. push uploads only the model directory's own files ---------------------------------------------------
@pytest.mark.parametrize("entry", ["abs", "dotdot", "symlink", "symlinked-part"])
def test_push_never_uploads_a_file_outside_the_directory(copy_of_tiny, tmp_path, entry):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    if entry == "abs":
        name = str(secret)
    elif entry == "dotdot":
        name = "../id_rsa"
    elif entry == "symlink":
        name = "dinov2/evil.safetensors"
        (copy_of_tiny / name).symlink_to(secret)
    else:  # a bundled part that is a symlink to a folder outside
        outside = tmp_path / "outside"
        shutil.move(copy_of_tiny / "clip", outside)
        (outside / "id_rsa").write_text("PRIVATE KEY")
        (copy_of_tiny / "clip").symlink_to(outside)
        name = None
    if name is not None:
        edit_json(copy_of_tiny / CONFIG_FILE, lambda c: c["weights_sha256"].update({name: "0" * 64}))
    with pytest.raises(UserError) as err:
        upload_files(copy_of_tiny)
    message = str(err.value)
    assert "\n" not in message
    assert (name or "clip/") in message
    told = []
    with pytest.raises(UserError) as err:  # refused before any upload (offline, an upload would fail otherwise)
        push(str(copy_of_tiny), "acme/tiny", echo=told.append)
    assert "cannot push" not in str(err.value) and told == []


def test_push_names_what_it_uploads(tiny_dir):
    told = []
    with pytest.raises(UserError, match="cannot push"):  # offline: the upload itself fails
        push(str(tiny_dir), "acme/tiny", echo=told.append)
    assert told == [f"upload {f}" for f in upload_files(tiny_dir)]


# -- 3. a replaced weight file is never trusted from an in-process cache ---------------------------------
@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory):
    """Same architecture as `tiny_dir` (hence same-size weight files), other weights."""
    return dinov2clip.make_tiny(str(tmp_path_factory.mktemp("other") / "tiny"), seed=1)


def replace_keeping_mtime(target: Path, source: Path, in_place: bool) -> None:
    st = target.stat()
    assert source.stat().st_size == st.st_size
    if in_place:
        shutil.copyfile(source, target)
    else:
        shutil.copyfile(source, target.with_name("new"))
        os.replace(target.with_name("new"), target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("in_place", [True, False])
def test_a_same_size_replacement_with_its_mtime_restored_is_refused(copy_of_tiny, other_tiny, in_place):
    dinov2clip.load(str(copy_of_tiny), device="cpu", dtype="fp32")  # hashes (and caches) every file
    replace_keeping_mtime(copy_of_tiny / "dinov2/model.safetensors", other_tiny / "dinov2/model.safetensors",
                          in_place)
    with pytest.raises(UserError, match="dinov2/model.safetensors does not match its sha256"):
        dinov2clip.load(str(copy_of_tiny), device="cpu", dtype="fp32")


def test_a_cached_text_tower_is_not_served_for_replaced_weights(copy_of_tiny, other_tiny):
    dinov2clip.load_encoders(str(copy_of_tiny), image=False, device="cpu", dtype="fp32")
    replace_keeping_mtime(copy_of_tiny / "clip/open_clip_model.safetensors",
                          other_tiny / "clip/open_clip_model.safetensors", in_place=True)
    with pytest.raises(UserError, match="do not match their sha256"):
        dinov2clip.load_encoders(str(copy_of_tiny), image=False, device="cpu", dtype="fp32")


# -- 2. loaded weights are in memory: overwriting or truncating their files changes nothing -----------------
WEIGHTS_CHANGE_UNDER_A_LOADED_MODEL = r"""
import shutil, sys
from pathlib import Path
import numpy as np
from PIL import Image
import dinov2clip

mine, other = Path(sys.argv[1]), Path(sys.argv[2])
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
full = dinov2clip.load(str(mine), device="cpu", dtype="fp32")
text_only = dinov2clip.load_encoders(str(mine), image=False, device="cpu", dtype="fp32")
teacher = dinov2clip.load_encoders(str(mine), image=False, teacher=True, device="cpu", dtype="fp32")
before = [full.encode_image([image]), full.encode_text(["a dog"]), text_only.encode_text(["a dog"]),
          teacher.encode_text(["a dog"])]
for rel in ("dinov2/model.safetensors", "projector.safetensors", "clip/open_clip_model.safetensors"):
    shutil.copyfile(other / rel, mine / rel)  # in place: the same inode, new bytes
after_overwrite = [full.encode_image([image]), full.encode_text(["a dog"]), text_only.encode_text(["a dog"]),
                   teacher.encode_text(["a dog"])]
for rel in ("dinov2/model.safetensors", "projector.safetensors", "clip/open_clip_model.safetensors"):
    open(mine / rel, "r+b").truncate(64)
after_truncate = [full.encode_image([image]), full.encode_text(["a dog"]), text_only.encode_text(["a dog"]),
                  teacher.encode_text(["a dog"])]
for a, b, c in zip(before, after_overwrite, after_truncate):
    assert np.array_equal(a.numpy(), b.numpy()) and np.array_equal(a.numpy(), c.numpy())
print("same")
"""


def test_weights_overwritten_or_truncated_under_a_loaded_model_change_nothing(copy_of_tiny, other_tiny):
    proc = subprocess.run([sys.executable, "-c", WEIGHTS_CHANGE_UNDER_A_LOADED_MODEL, str(copy_of_tiny),
                           str(other_tiny)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]  # a memory-mapped file gives SIGBUS (-7) when truncated
    assert proc.stdout.strip().endswith("same")


HUB_WEIGHTS_CHANGE_UNDER_A_LOADED_BACKBONE = r"""
import os, sys
from pathlib import Path
import torch
from dinov2clip.dinov2 import DinoV2Encoder, load_dinov2_backbone

weights = Path(sys.argv[1])  # the hub cache's copy of the repo's model.safetensors
encoder = DinoV2Encoder(load_dinov2_backbone("test-org/dinov2-tiny"), "mean")
pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    before = encoder(pixels)
    weights.write_bytes(Path(sys.argv[2]).read_bytes())  # other weights, in place
    after_overwrite = encoder(pixels)
    open(weights, "r+b").truncate(64)
    after_truncate = encoder(pixels)
assert torch.equal(before, after_overwrite) and torch.equal(before, after_truncate)
print("same")
"""


def test_hub_id_weights_overwritten_or_truncated_under_a_loaded_backbone_change_nothing(tmp_path):
    """A DINOv2 loaded by hub id (from huggingface_hub's cache) is in memory too, not mapped from the cache."""
    from transformers import Dinov2Config, Dinov2Model

    from testsupport import seed_hub_repo

    cfg = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=14,
               image_size=28)
    for seed, name in ((0, "mine"), (1, "other")):
        torch.manual_seed(seed)
        Dinov2Model(Dinov2Config(**cfg)).save_pretrained(tmp_path / name)
    seed_hub_repo("test-org/dinov2-tiny", {n: tmp_path / "mine" / n for n in ("config.json", "model.safetensors")})
    cached = next(Path(os.environ["HF_HUB_CACHE"]).glob("models--test-org--dinov2-tiny/snapshots/*/model.safetensors"))
    proc = subprocess.run([sys.executable, "-c", HUB_WEIGHTS_CHANGE_UNDER_A_LOADED_BACKBONE, str(cached),
                           str(tmp_path / "other" / "model.safetensors")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]  # mapped: SIGBUS (-7) when truncated, or other outputs
    assert proc.stdout.strip().endswith("same")


def test_a_dinov2_source_without_safetensors_is_refused_in_one_line(tmp_path):
    from transformers import Dinov2Config

    from dinov2clip.dinov2 import load_dinov2_backbone

    Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "d")
    torch.save({}, tmp_path / "d" / "pytorch_model.bin")
    with pytest.raises(UserError, match="no safetensors weights"):
        load_dinov2_backbone(str(tmp_path / "d"))


# -- 4. nothing named by a model directory runs as code ----------------------------------------------------
def code_folder(folder: Path, marker: Path) -> Path:
    """A tokenizer/model folder whose configuration names custom code that would leave `marker` if run."""
    folder.mkdir(parents=True)
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PreTrainedTokenizer as Tok\n"
    (folder / "tok.py").write_text(code)
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok.Tok", None]}}))
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {"AutoConfig": "tok.Tok",
                                                                                        "AutoModel": "tok.Tok"}}))
    return folder


@pytest.mark.parametrize("key", ["hf_tokenizer_name", "hf_model_name"])
@pytest.mark.parametrize("name", ["ABSOLUTE", "../evil", "evil"])  # the last: a hub-id spelling that is a folder here
def test_a_bundled_config_naming_a_local_folder_is_refused_and_runs_nothing(copy_of_tiny, tmp_path, monkeypatch,
                                                                            key, name):
    marker = tmp_path / "ran"
    folder = code_folder(tmp_path / "evil", marker)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub" if name == "../evil" else tmp_path)
    name = str(folder) if name == "ABSOLUTE" else name

    def edit(cfg):
        cfg["model_cfg"]["text_cfg"][key] = name
        if key == "hf_model_name":
            cfg["model_cfg"]["custom_text"] = True
    edit_json(copy_of_tiny / "clip" / "open_clip_config.json", edit)
    digest = file_sha256(copy_of_tiny / "clip" / "open_clip_config.json")  # as a crafted directory would record it
    edit_json(copy_of_tiny / CONFIG_FILE, lambda c: c["weights_sha256"].update({"clip/open_clip_config.json": digest}))
    for kwargs in ({"image": False}, {"teacher": True}):
        with pytest.raises(UserError, match=f"text_cfg.{key} .* is not a Hugging Face hub id") as err:
            dinov2clip.load_encoders(str(copy_of_tiny), device="cpu", **kwargs)
        assert "\n" not in str(err.value)
    assert not marker.exists()


# -- 6. an unwritable folder or a full disk is the user's one-line error, and leaves nothing behind ----------
def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and "Writing model shards" not in line]


def test_an_unwritable_output_folder_is_one_line_exit_2(tmp_path):
    out = "/sys/dinov2clip-hardening-test"  # no one may create files in sysfs, root included
    proc = subprocess.run([sys.executable, "-m", "dinov2clip", "make-tiny", out], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr
    [line] = error_lines(proc.stderr)
    assert line.startswith(f"dinov2clip: error: cannot write model directory {out}: ")
    assert line.endswith(("Operation not permitted", "Permission denied")) and "Traceback" not in proc.stderr


@pytest.mark.parametrize("mount, problem", [("ro", "Read-only file system"), ("size=64k", "No space left on device"),
                                            ("size=300k", "No space left on device")])
def test_a_read_only_or_full_disk_is_one_line_exit_2_and_leaves_no_temporaries(tmp_path, mount, problem):
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (unshare -rm refused)")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o {mount} tmpfs {disk} && {sys.executable} -m dinov2clip make-tiny {disk}/out; "
              f"echo rc=$? >&2; ls -A {disk} >&2")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    lines = error_lines(proc.stderr)
    assert lines == [f"dinov2clip: error: cannot write model directory {disk}/out: {problem}", "rc=2"], proc.stderr


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_write_and_a_live_ones_kept(tmp_path):
    """A killed download (`bundle`, FiftyOne's download_model) or make-tiny left its hidden temporary folder
    beside the target for good, gigabytes for a preset; the next write of that target removes it. A temporary
    of a writer still running, and a replaced folder kept between two renames, are left alone."""
    import signal

    from dinov2clip.atomic import OLD_MARK, temp_name

    out = tmp_path / "model"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from dinov2clip.atomic import AtomicDir\n"
        f"with AtomicDir(Path({str(out)!r})) as tmp:\n"
        "    (tmp / 'weights.part').write_bytes(b'0' * 1000)\n"
        "    print('writing', flush=True); time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    [left] = tmp_path.glob(".model.tmp-*")
    assert (left / "weights.part").is_file() and not out.exists()
    live = temp_name(out)  # this process's pid: a writer still at work
    live.mkdir()
    kept = temp_name(out, OLD_MARK)
    kept.mkdir()
    proc = subprocess.run([sys.executable, "-m", "dinov2clip", "make-tiny", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (out / CONFIG_FILE).is_file()
    assert not left.exists() and live.is_dir() and kept.is_dir()


# -- 7. text queries are bounded before tokenising, and must be strings --------------------------------------
def test_a_huge_query_is_cut_before_tokenising_and_non_strings_are_refused(tiny_dir):
    from open_clip.tokenizer import SimpleTokenizer

    from dinov2clip.model import TEXT_CHARS_PER_TOKEN

    class Spy(SimpleTokenizer):  # the real tokenizer, recording the longest text it was given
        longest = 0

        def __call__(self, texts, *args, **kwargs):
            Spy.longest = max([Spy.longest, *map(len, texts)])
            return super().__call__(texts, *args, **kwargs)

    encoders = dinov2clip.load_encoders(str(tiny_dir), image=False, device="cpu", dtype="fp32")
    encoders.tokenizer = Spy(context_length=77)
    bound = TEXT_CHARS_PER_TOKEN * 77
    huge = "".join(chr(ord("a") + (i * 7919) % 26) for i in range(40_000))  # one word, no spaces
    got = encoders.encode_text([huge, "a dog"])
    assert Spy.longest <= bound
    assert (got.numpy() == encoders.encode_text([huge[:bound], "a dog"]).numpy()).all()
    for wrong in (None, 5, b"a dog", ["a dog", None], [b"a dog"]):
        with pytest.raises(UserError, match="strings") as err:
            encoders.encode_text(wrong)
        assert "\n" not in str(err.value)
    assert encoders.encode_text([]).shape == (0, encoders.embed_dim)  # nothing asked, nothing given


# -- 5. identity covers behaviour: edited tower configs are refused, an edited preprocessing is another model ---
@pytest.mark.parametrize("rel, edit, loads", [  # every load that reads the tower
    ("dinov2/config.json", lambda c: c.update(layer_norm_eps=1e-2), [{}, {"text": False}]),
    ("clip/open_clip_config.json", lambda c: c["model_cfg"].update(quick_gelu=False),
     [{}, {"image": False}, {"teacher": True}]),
])
def test_an_edited_tower_config_is_refused_at_load(copy_of_tiny, rel, edit, loads):
    edit_json(copy_of_tiny / rel, edit)
    for kwargs in loads:
        with pytest.raises(UserError, match=f"{rel} does not match its sha256") as err:
            dinov2clip.load(str(copy_of_tiny), device="cpu", **kwargs)
        assert "\n" not in str(err.value)


def test_an_edited_preprocessing_block_is_other_encoders(copy_of_tiny, tiny_dir):
    ours = dinov2clip.load_encoders(str(tiny_dir), image=False, text=False)
    edit_json(copy_of_tiny / CONFIG_FILE, lambda c: c["preprocess"].update(resize=288))
    edited = dinov2clip.load_encoders(str(copy_of_tiny), image=False, text=False)
    assert edited.encoder_fingerprint != ours.encoder_fingerprint
    assert identity.towers(edited.config) != identity.towers(ours.config)
    with pytest.raises(UserError, match="was trained for encoders"):  # its projector saw other pixels
        dinov2clip.load(str(copy_of_tiny), device="cpu")


def test_a_directory_written_before_config_hashes_still_loads(copy_of_tiny, tiny_model):
    edit_json(copy_of_tiny / CONFIG_FILE, lambda c: c.update(format_version="1.1", weights_sha256={
        k: v for k, v in c["weights_sha256"].items() if not k.endswith(".json")}))
    old = dinov2clip.load(str(copy_of_tiny), device="cpu", dtype="fp32")
    assert old.fingerprint == tiny_model.fingerprint
    assert (old.encode_text(["a dog"]).numpy() == tiny_model.encode_text(["a dog"]).numpy()).all()


# A check then a second read would let a file swapped in between be what loads: each tower config is read once,
# and what is parsed is the bytes that were hashed (Python's audit hook sees every open, in a fresh process).
COUNT_OPENS = """
import collections, os, sys
import dinov2clip
root = sys.argv[1]
opened = collections.Counter()
sys.addaudithook(lambda ev, args: ev == "open" and isinstance(args[0], str) and args[0].startswith(root)
                 and args[0].endswith(".json") and opened.update([os.path.relpath(args[0], root)]))
for kwargs in ({}, {"image": False}, {"teacher": True}):
    dinov2clip.load(root, device="cpu", **kwargs)
    print(sorted(opened.items()))
    opened.clear()
    dinov2clip.factory._TEXT_TOWERS.clear()  # the next load reads the text tower again
"""


def test_each_tower_config_is_read_once_from_the_bytes_its_hash_was_checked_on(copy_of_tiny):
    out = subprocess.run([sys.executable, "-c", COUNT_OPENS, str(copy_of_tiny)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    full, text_only, teacher = (dict(eval(line)) for line in out.stdout.strip().splitlines())
    for opened in (full, teacher):
        assert opened.get("dinov2/config.json") == 1 and opened.get("clip/open_clip_config.json") == 1, opened
    assert text_only.get("clip/open_clip_config.json") == 1 and "dinov2/config.json" not in text_only, text_only

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

import dinov2clip
from dinov2clip import UserError
from dinov2clip.config import CONFIG_FILE
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

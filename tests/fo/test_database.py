"""FiftyOne's database on a fresh machine (issue: the README's command must not stop at "MongoDB could not be
installed"). The install path itself runs in CI's fresh-venv main job (it needs the package index); here:
the decisions that keep a working setup untouched, and the one-line errors."""
import subprocess
import sys

import pytest

from dinov2clip.errors import UserError
from fiftyone_dinov2clip import database


def test_a_configured_uri_or_a_running_mongod_is_never_touched(monkeypatch):
    monkeypatch.setattr(subprocess, "run", None)  # any install attempt would crash here
    monkeypatch.setenv("FIFTYONE_DATABASE_URI", "mongodb://user:secret@db.example:27017")
    assert database.ensure_mongodb() == "FiftyOne uses the configured database db.example:27017"


def test_the_bundled_mongod_is_found_and_runs(monkeypatch):
    monkeypatch.delenv("FIFTYONE_DATABASE_URI", raising=False)
    monkeypatch.setenv("FIFTYONE_CONFIG_PATH", "/nonexistent/config.json")
    exe = database.bundled_mongod()
    assert exe is not None and exe.name == "mongod" and database.runs(exe)
    assert database.ensure_mongodb() == f"FiftyOne's own mongod runs: {exe}"
    assert database.wheel_fits()  # this machine kind (Debian 12, x86-64, glibc 2.36)


def test_an_unsupported_machine_gets_one_line_naming_the_fix(monkeypatch):
    monkeypatch.delenv("FIFTYONE_DATABASE_URI", raising=False)
    monkeypatch.setenv("FIFTYONE_CONFIG_PATH", "/nonexistent/config.json")
    monkeypatch.setattr(database, "bundled_mongod", lambda: None)
    monkeypatch.setattr(database.platform, "machine", lambda: "aarch64")
    with pytest.raises(UserError, match="FIFTYONE_DATABASE_URI") as err:
        database.ensure_mongodb()
    assert "\n" not in str(err.value) and "x86-64 Linux with glibc" in str(err.value)


def test_database_failures_become_one_line():
    FiftyOneConfigError = type("FiftyOneConfigError", (Exception,), {})
    with pytest.raises(UserError, match="python -m fiftyone_dinov2clip database"):
        with database.database_errors():
            raise FiftyOneConfigError("MongoDB could not be installed on your system.\nmore")
    with pytest.raises(KeyError):  # anything else stays what it is
        with database.database_errors():
            raise KeyError("x")


def test_database_command():
    out = subprocess.run([sys.executable, "-m", "fiftyone_dinov2clip", "database"], capture_output=True, text=True,
                         timeout=120)
    # the session's isolated settings point FiftyOne at the test mongod
    assert out.returncode == 0 and out.stdout.startswith("FiftyOne uses the configured database 127.0.0.1:"), out

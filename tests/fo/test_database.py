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


def _cli_and_plain_fiftyone(env: dict) -> tuple[str, str]:
    """stderr+stdout of a dinov2clip command and of plain FiftyOne, both connecting to the database."""
    cli = subprocess.run([sys.executable, "-m", "fiftyone_dinov2clip", "index", "no-such-dataset", "--model", "x"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2 and "is neither a folder of images nor a FiftyOne dataset" in cli.stderr, cli.stderr
    plain = subprocess.run([sys.executable, "-c", "import fiftyone as fo; fo.list_datasets()"], env=env,
                           capture_output=True, text=True, timeout=300)
    return cli.stdout + cli.stderr, plain.stdout + plain.stderr


def test_fiftyones_own_mongod_gets_no_oldest_version_notice_but_a_configured_one_does(tmp_path, mongod):
    """Issue 21: the mongod the project installs (6.0.5) made FiftyOne print 'You are running the oldest supported
    major version of MongoDB…' on every command of the main job; a database the user configured keeps it."""
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("FIFTYONE_DATABASE_URI", "FIFTYONE_DATABASE_VALIDATION")}
    env.update(PYTHONPATH=str(repo), FIFTYONE_CONFIG_PATH=str(tmp_path / "none.json"),
               FIFTYONE_DATABASE_DIR=str(tmp_path / "db"), FIFTYONE_DATABASE_NAME=f"quiet-{os.getpid()}")
    try:
        ours, plain = _cli_and_plain_fiftyone(env)  # FiftyOne's own mongod
    finally:
        subprocess.run(["pkill", "-f", str(tmp_path / "db")])  # the mongod FiftyOne started for this test, if any
    assert database.OLDEST_MONGODB in plain  # the notice this machine's mongod gets
    assert database.OLDEST_MONGODB not in ours, ours
    ours, plain = _cli_and_plain_fiftyone({**env, "FIFTYONE_DATABASE_URI": f"mongodb://127.0.0.1:{mongod.port}"})
    assert database.OLDEST_MONGODB in ours and database.OLDEST_MONGODB in plain

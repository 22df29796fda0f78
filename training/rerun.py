"""Reruns resume, or refuse: a finished or interrupted job is only continued with the config it started with.

Every stage that can be rerun in place (pipeline, train --resume, planted) records its config beside its
outputs and compares it on the next run: the same config resumes (or reports the finished result), a
changed one stops with the changed keys and how to start over, never returns the old result."""
from __future__ import annotations

import json
from pathlib import Path

from dinov2clip.atomic import write_json_atomic
from dinov2clip.errors import UserError


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (added, removed or changed), nested dicts walked."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out


def describe(keys: list[str], old: dict, new: dict) -> str:
    def get(d, dotted):
        for part in dotted.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    shown = [f"{k} {json.dumps(get(old, k))} → {json.dumps(get(new, k))}" for k in keys[:4]]
    return ", ".join(shown) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def check_same_config(recorded: dict, now: dict, what: str, start_over: str) -> None:
    """Refuse (one line) when `now` differs from the config `what` was made with."""
    keys = changed_keys(recorded, now)
    if keys:
        raise UserError(f"{what} was made with another config (changed: {describe(keys, recorded, now)}); "
                        f"its results are not this config's: {start_over}")


def record_or_check(path: Path, config: dict, what: str, start_over: str, made: bool) -> None:
    """First run: record `config` at `path`. Rerun: refuse a changed config. `made`: whether outputs of an
    earlier run exist — such outputs with no record are refused too (their config is unknown)."""
    path = Path(path)
    if path.is_file():
        check_same_config(json.loads(path.read_text())["config"], config, what, start_over)
        return
    if made:
        raise UserError(f"{what} holds results of an earlier run whose config was not recorded: {start_over}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"config": config})

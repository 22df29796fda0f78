"""Shared ending of the benchmark scripts: print the table and its notes, write the JSON."""
from __future__ import annotations

import json
from pathlib import Path


def publish(results: dict, table_text: str, notes: str, out: str | Path) -> dict:
    """Print `table_text` and `notes`; write `results` (plus the table's lines) to `out` as JSON."""
    print(f"\n{table_text}\n\n{notes}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**results, "table": table_text.splitlines()}, indent=2))
    print(f"results written to {out}")
    return results

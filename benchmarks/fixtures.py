"""What several benchmark scripts set up the same way."""
from __future__ import annotations

import platform
import time
from pathlib import Path


def reference_model_dir(model_dir: str | None, home: Path, seed: int = 0, log=print) -> Path:
    """`model_dir` if it already holds something (reused as is), else a reference-size random model built
    there (or under `home`): dinov2-base + ViT-B/16 + 768→2048×6→512; speed does not depend on weight values."""
    import dinov2clip

    path = Path(model_dir) if model_dir else home / "model"
    if (path / "config.json").is_file() or (path.is_dir() and any(path.iterdir())):
        log(f"[model] reusing {path}")
        return path
    log(f"[model] building a reference-size random model in {path} ...")
    start = time.perf_counter()
    dinov2clip.make_tiny(str(path), seed=seed, size="reference")
    log(f"[model] built in {time.perf_counter() - start:.0f} s")
    return path


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for the line that says where a figure came from."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

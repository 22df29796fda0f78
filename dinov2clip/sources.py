"""Where weights come from: local paths, http(s) URLs (cached), and `hf-hub:` repos."""
from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

from .atomic import atomic_path
from .errors import UserError, first_line

HF_PREFIX = "hf-hub:"
LOCAL_PREFIX = "local-dir:"
HUB_ALLOW = ["config.json", "projector.safetensors", "README.md", "LICENSE*", "dinov2/*", "clip/*"]


def cache_dir() -> Path:
    root = os.environ.get("DINOV2CLIP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dinov2clip"
    return Path(root)


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("DINOV2CLIP_OFFLINE", "HF_HUB_OFFLINE"))


def url_cache_path(url: str) -> Path:
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return cache_dir() / "downloads" / f"{digest}-{Path(url.split('?')[0]).name or 'file'}"


_BRING_YOUR_OWN = ("fit one to your own images, no captions needed: `python -m training.run fit IMAGES --model "
                   "reference --out my-model`, then use `--model my-model`; or pass a projector you have "
                   "(--projector PATH on the command line, projector=PATH in Python: a .pt/.safetensors file or "
                   "model directory)")


def fetch_url(url: str, timeout: float = 60.0) -> Path:
    """Download once into the cache (temporary name, then rename); return the cached path."""
    target = url_cache_path(url)
    if target.is_file():
        return target
    if offline():
        raise UserError(f"projector {url} is not in the cache ({target}) and downloads are off "
                        f"(HF_HUB_OFFLINE/DINOV2CLIP_OFFLINE): {_BRING_YOUR_OWN}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        from tqdm.auto import tqdm

        with atomic_path(target) as tmp, urllib.request.urlopen(url, timeout=timeout) as resp, \
                open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {target.name}") as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
    except Exception as e:
        raise UserError(f"cannot download projector from {url} (unverified URL; {type(e).__name__}: "
                        f"{e}): {_BRING_YOUR_OWN}") from None
    return target


def split_hub(spec: str) -> tuple[str, str | None]:
    """`org/repo` or `org/repo/path/in/repo` → (repo_id, filename or None)."""
    parts = spec.strip("/").split("/")
    if len(parts) < 2:
        raise UserError(f"hub repo must look like 'hf-hub:org/repo', got {HF_PREFIX}{spec}")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def hub_snapshot(repo_spec: str) -> Path:
    """Download (or reuse from the hub cache) a model directory's files."""
    from huggingface_hub import snapshot_download

    repo_id, _ = split_hub(repo_spec)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW))
    except Exception as e:
        raise UserError(f"cannot fetch {HF_PREFIX}{repo_id} ({type(e).__name__}: "
                        f"{first_line(e)})") from None


def resolve_projector_file(spec: str) -> Path:
    """A projector source (path, URL or `hf-hub:`) → a local file or model directory."""
    if spec.startswith(("http://", "https://")):
        return fetch_url(spec)
    if spec.startswith(HF_PREFIX):
        from huggingface_hub import hf_hub_download

        repo_id, filename = split_hub(spec[len(HF_PREFIX):])
        try:
            return Path(hf_hub_download(repo_id, filename or "projector.safetensors"))
        except Exception as e:
            raise UserError(f"cannot fetch projector {spec} ({type(e).__name__}): {_BRING_YOUR_OWN}") from None
    path = Path(spec.removeprefix(LOCAL_PREFIX)).expanduser()
    if not path.exists():
        raise UserError(f"projector not found: {path}")
    return path

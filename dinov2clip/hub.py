"""Publishing a model directory to the Hugging Face Hub, with a generated model card."""
from __future__ import annotations

import json
from pathlib import Path

from . import identity
from .config import CONFIG_FILE, check_relative, read_config
from .errors import UserError, first_line

CARD_FILE = "README.md"


def upload_files(model_dir: Path) -> list[str]:
    """The files a push uploads: config, weights and licence, never temporaries or caches. Every name,
    including those config.json lists, must resolve (symlinks followed) to a file inside the directory:
    a crafted config must not make a push upload /root/.ssh/id_rsa."""
    config = read_config(model_dir)
    files = {CONFIG_FILE, *config.weights_sha256}
    for rel in ("dinov2", "clip"):
        part = model_dir / rel
        if part.is_dir():
            files.update(p.relative_to(model_dir).as_posix() for p in part.iterdir()
                         if p.is_file() and not p.name.endswith((".tmp", ".part")))
    files.update(p.name for p in model_dir.glob("LICENSE*") if p.is_file())
    root = model_dir.resolve()
    for rel in sorted(files):
        check_relative(rel, f"{model_dir}: {CONFIG_FILE}")
        if not (root / rel).resolve().is_relative_to(root):
            raise UserError(f"{model_dir}: {rel} points outside the model directory: refusing to upload it")
    missing = sorted(f for f in files if not (model_dir / f).is_file())
    if missing:
        raise UserError(f"{model_dir}: missing files {', '.join(missing)}")
    return sorted(files | {CARD_FILE})


def model_card(model_dir: Path, repo_id: str) -> str:
    config = read_config(model_dir)
    d, c, p = config.dinov2, config.clip, config.projector
    metrics = config.provenance.get("metrics")
    lines = [
        "---",
        f"license: {_hub_license(config.license)}",
        "library_name: dinov2clip",
        "tags: [dinov2, clip, image-text-retrieval, embeddings, dinov2clip]",
        "---",
        f"# {repo_id}",
        "",
        "A [dinov2clip](https://github.com/dinov2clip/dinov2clip) model: DINOv2 image embeddings projected "
        "into CLIP space, so CLIP's text encoder can search DINOv2-indexed images.",
        "",
        "| part | value |", "| --- | --- |",
        f"| DINOv2 | `{d.get('origin') or d['source']}` ({d['pooling']} pooling) |",
        f"| CLIP text tower | `{c['model_name']}` / `{c.get('pretrained')}` |",
        f"| projector | {p['input_dim']}→{p['hidden_dim']}×{p['num_blocks']}→{p['output_dim']} |",
        f"| embedding space fingerprint | `{identity.model(config, p.get('tensor_sha256'))}` |",
        f"| licence | {config.license} |",
        f"| format version | {config.format_version} |",
        "",
        "## Use",
        "```python",
        "import dinov2clip",
        f'model = dinov2clip.load("hf-hub:{repo_id}")',
        'images = model.encode_image(["photo.jpg"])',
        'texts = model.encode_text(["a dog on a beach"])',
        "scores = images @ texts.T",
        "```",
        "",
        "## Provenance",
        "```json",
        json.dumps(config.provenance, indent=2, sort_keys=True),
        "```",
    ]
    if metrics:
        lines += ["", "## Metrics", "Recall figures as recorded at training time (split and K stated).",
                  "```json", json.dumps(metrics, indent=2, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"


def _hub_license(license: str) -> str:
    key = license.split()[0].lower().rstrip(",;:")
    return key if key in {"apache-2.0", "mit", "bsd-3-clause", "cc-by-4.0", "cc-by-nc-4.0"} else "other"


def push(model_dir: str, repo_id: str, private: bool = False, token: str | None = None, echo=None) -> str:
    """Upload a model directory (plus a generated README.md) to `repo_id`; returns the commit URL.
    `echo(line)` is told each file before anything is uploaded (the CLI prints them)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    root = Path(model_dir)
    files = upload_files(root)
    for f in files if echo else ():
        echo(f"upload {f}")
    card = model_card(root, repo_id).encode()
    # the checked, resolved path: what was checked inside the directory is what is read
    ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str((root / f).resolve()))
           for f in files if f != CARD_FILE]
    ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations=ops, commit_message="Upload dinov2clip model")
    except Exception as e:
        raise UserError(f"cannot push to hf-hub:{repo_id} ({type(e).__name__}: "
                        f"{first_line(e)})") from None
    return str(getattr(info, "commit_url", info))

"""The precomputed shard format (DESIGN §5), its writer and its readers' checks: one directory per shard,
`OUT/shards/NAME/` with float16 arrays, text.json and meta.json (written last; see `training.precompute`)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from dinov2clip import identity
from dinov2clip.atomic import TMP_MARK, temp_name
from dinov2clip.errors import UserError

FORMAT = "dinov2clip-precompute/1"
ARRAYS = ("dinov2_cls", "dinov2_patch_mean", "clip_image", "clip_text")
META, TEXT = "meta.json", "text.json"


def encoders_record(enc, source: str) -> dict:
    """What a shard's numbers depend on, recorded in its meta. `fingerprint` is of the towers alone (no
    pooling: a shard holds every pooling); shards with different fingerprints never mix."""
    cfg = enc.config
    return {"fingerprint": identity.towers(cfg), "source": source, "config": enc.found_config().to_dict(),
            "teacher_preprocess": enc.teacher_preprocess, "dtype": str(enc.dtype).removeprefix("torch."),
            "teacher_dtype": str(enc.teacher_dtype).removeprefix("torch.")}


# -- writer --------------------------------------------------------------------------------------

def write_shard(out_dir, name: str, arrays: dict[str, np.ndarray], keys: list[str], captions: list[str],
                meta: dict) -> Path:
    """Write one shard directory atomically: a temporary sibling, renamed when complete."""
    final = Path(out_dir) / "shards" / name
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    tmp.mkdir()
    hashes = {}
    for key in ARRAYS:
        arr = np.ascontiguousarray(arrays[key], dtype=np.float16)
        np.save(tmp / f"{key}.npy", arr)
        hashes[key] = hashlib.sha256(arr.tobytes()).hexdigest()
    (tmp / TEXT).write_text(json.dumps({"keys": keys, "captions": captions}))
    full = {"format": FORMAT, "name": name, "count": len(keys), "dinov2_dim": int(arrays["dinov2_cls"].shape[1]),
            "clip_dim": int(arrays["clip_image"].shape[1]), "sha256": hashes, **meta}
    (tmp / META).write_text(json.dumps(full, indent=2))
    if final.exists():  # an older complete copy (overwrite): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def is_done(out_dir, name: str) -> bool:
    return (Path(out_dir) / "shards" / name / META).is_file()


def clean_partial(out_dir, names: Sequence[str]) -> None:
    """Remove the temporary directories a killed run left for these shards. Only this rank writes them, so
    on a shared filesystem no other rank's shard in progress is touched."""
    root = Path(out_dir) / "shards"
    for name in names:
        for p in root.glob(f".{name}{TMP_MARK}*"):
            shutil.rmtree(p, ignore_errors=True)


def fingerprints(out_dir) -> dict[str, list[str]]:
    """Encoder fingerprint → names of the finished shards under `out_dir` computed with it."""
    root = Path(out_dir) / "shards"
    found: dict[str, list[str]] = {}
    for path in sorted(root.glob(f"*/{META}")) if root.is_dir() else []:
        meta = json.loads(path.read_text())
        if meta.get("format") == FORMAT:  # only shards this stage wrote (they alone may be replaced)
            found.setdefault(str(identity.of_shard(meta)), []).append(path.parent.name)
    return found


def check_one_encoder(found: dict[str, list[str]], where: str) -> str:
    """The single encoder fingerprint of a set of shards; shards of two encoders are refused."""
    if len(found) > 1:
        (a, na), (b, nb) = list(found.items())[:2]
        raise UserError(f"{where} mixes shards of two encoders: {a[:12]} ({na[0]}, ...) and {b[:12]} ({nb[0]}, ...); "
                        "their embeddings are not comparable: precompute each model into its own --out")
    return next(iter(found), "")


def manifest(out_dir) -> dict:
    """Every finished shard's meta (sorted by name) and one hash over their array hashes: the data identity."""
    root = Path(out_dir) / "shards"
    metas = [json.loads(p.read_text()) for p in sorted(root.glob(f"*/{META}"))] if root.is_dir() else []
    if not metas:
        raise UserError(f"no precomputed shards under {out_dir} (run the precompute stage first)")
    ident = [(m["name"], m["count"], m["sha256"]) for m in metas]
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return {"shards": metas, "sha256": digest, "count": sum(m["count"] for m in metas)}

"""Retrieval evaluation sets: Karpathy caption files and plain image folders (DESIGN §6).

A `RetrievalSet` is what the metric needs (image paths, captions, each caption's image index) plus
where it came from (file hash, split, image root) and what was skipped, so a report can say exactly
what was measured. Every problem with the input is one `UserError` line naming the file and entry.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from dinov2clip.config import file_sha256
from dinov2clip.errors import UserError

KARPATHY_NAMES = {"coco": "MSCOCO", "flickr8k": "Flickr8k", "flickr30k": "Flickr30k"}
_IMAGE_COLUMNS = ("image", "filename", "file_name", "file", "path")
_CAPTION_COLUMNS = ("caption", "captions", "text", "sentence", "raw")
_SKIP_HINT = "pass --skip-missing to skip missing images and count them in the report"


@dataclass
class RetrievalSet:
    name: str  # "coco", "flickr30k", a folder's name...
    kind: str  # "karpathy" or "folder"
    images: list[Path]
    entries: list[str]  # where each image comes from in the annotation file, for messages and reports
    captions: list[str]
    text_image_ids: list[int]
    annotation_file: Path
    image_root: Path
    split: str | None = None
    skipped: list[dict] = field(default_factory=list)  # {"entry", "path", "reason", "captions"}
    annotation_sha256: str = ""

    def __post_init__(self):
        if not self.annotation_sha256:
            self.annotation_sha256 = file_sha256(self.annotation_file)

    @property
    def display_name(self) -> str:
        return KARPATHY_NAMES.get(self.name, self.name) if self.kind == "karpathy" else self.name

    def without(self, reasons: dict[int, str]) -> "RetrievalSet":
        """A copy without the images at these indices (and their captions), each recorded as skipped."""
        if not reasons:
            return self
        counts = [0] * len(self.images)
        for i in self.text_image_ids:
            counts[i] += 1
        keep = [i for i in range(len(self.images)) if i not in reasons]
        new_index = {old: new for new, old in enumerate(keep)}
        pairs = [(c, new_index[i]) for c, i in zip(self.captions, self.text_image_ids) if i in new_index]
        skipped = self.skipped + [{"entry": self.entries[i], "path": str(self.images[i]), "reason": reasons[i],
                                   "captions": counts[i]} for i in sorted(reasons)]
        return replace(self, images=[self.images[i] for i in keep], entries=[self.entries[i] for i in keep],
                       captions=[c for c, _ in pairs], text_image_ids=[i for _, i in pairs], skipped=skipped)

    def images_digest(self) -> str:
        """Identity of the image files (path, size, mtime) without reading them: a cache key part."""
        h = hashlib.sha256()
        for path in self.images:
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def summary(self) -> dict:
        with_captions = len(set(self.text_image_ids))
        return {"name": self.name, "display_name": self.display_name, "kind": self.kind,
                "annotation_file": str(self.annotation_file), "annotation_sha256": self.annotation_sha256,
                "image_root": str(self.image_root), "split": self.split, "images": len(self.images),
                "captions": len(self.captions), "images_without_captions": len(self.images) - with_captions,
                "skipped_images": len(self.skipped),
                "skipped_captions": sum(s["captions"] for s in self.skipped), "skipped": self.skipped}


def load_karpathy(path, image_root, split: str = "test", skip_missing: bool = False,
                  name: str | None = None) -> RetrievalSet:
    """A Karpathy caption file (`dataset_coco.json`, `dataset_flickr8k.json`, `dataset_flickr30k.json`)
    and its image root. `split` is one split or several joined by '+' (e.g. `train+restval`).

    An image is looked for at ROOT/filepath/filename, then ROOT/filename, so ROOT may be the COCO
    folder holding val2014/ or val2014/ itself."""
    path, root = Path(path), _check_root(image_root)
    data = _read_json(path)
    items = data.get("images") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise UserError(f"{path}: not a Karpathy caption file (expected an object with an 'images' list, "
                        "as in dataset_coco.json)")
    wanted = {s for s in split.split("+") if s}
    records = []
    for i, item in enumerate(items):
        filename, item_split, captions = _karpathy_entry(path, i, item)
        if item_split in wanted:
            sub = item.get("filepath") or ""
            candidates = [root / sub / filename, root / filename] if sub else [root / filename]
            found = next((c for c in candidates if c.is_file()), candidates[0])
            records.append((f"images[{i}] {filename}", found, captions))
    if not records:
        present = sorted({str(item.get("split")) for item in items})
        raise UserError(f"{path}: no images in split {split!r} (splits present: {', '.join(present) or 'none'})")
    label = name or (data.get("dataset") if isinstance(data.get("dataset"), str) else None) or path.stem
    return _assemble(label, "karpathy", records, path, root, split, skip_missing)


def load_folder(folder, captions_file, skip_missing: bool = False, name: str | None = None) -> RetrievalSet:
    """A folder of images with one captions file naming images relative to the folder:
    `.csv`/`.tsv`/`.txt` with a header (an image column: image, filename, file_name, file or path; a
    caption column: caption, text, sentence or raw), one row per caption; `.jsonl` with one such object
    per line; or `.json`, either such a list or an object mapping file name → caption or list of captions.
    Images appear in the order of their first caption."""
    root, path = _check_root(folder), Path(captions_file)
    if not path.is_file():
        raise UserError(f"captions file not found: {path}")
    by_image: dict[str, list[str]] = {}
    for where, image, caption in _caption_rows(path):
        if not isinstance(image, str) or not image or not isinstance(caption, str):
            raise UserError(f"{path}: {where}: needs an image file name and a caption string")
        by_image.setdefault(image, []).append(caption)
    if not by_image:
        raise UserError(f"{path}: no captions")
    records = [(image, root / image, caps) for image, caps in by_image.items()]
    return _assemble(name or root.name, "folder", records, path, root, None, skip_missing)


def name_uniquely(datasets: list[RetrievalSet]) -> list[RetrievalSet]:
    """Rename repeats in place — the same file twice, or two folders named alike: coco, coco-2... —
    so every set keys its own results."""
    seen: dict[str, int] = {}
    for ds in datasets:
        seen[ds.name] = seen.get(ds.name, 0) + 1
        if seen[ds.name] > 1:
            ds.name = f"{ds.name}-{seen[ds.name]}"
    return datasets


def _assemble(name, kind, records, path, root, split, skip_missing) -> RetrievalSet:
    missing = {i: "missing" for i, (_, image, _) in enumerate(records) if not image.is_file()}
    if missing and not skip_missing:
        entry, image, _ = records[min(missing)]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{path}: {entry}: image not found: {image}{more}; {_SKIP_HINT}")
    captions = [c for _, _, caps in records for c in caps]
    ids = [i for i, (_, _, caps) in enumerate(records) for _ in caps]
    if not captions:
        raise UserError(f"{path}: no captions in split {split!r}" if split else f"{path}: no captions")
    full = RetrievalSet(name=name, kind=kind, images=[image for _, image, _ in records],
                        entries=[entry for entry, _, _ in records], captions=captions, text_image_ids=ids,
                        annotation_file=path, image_root=root, split=split)
    out = full.without(missing)
    if not out.images:
        raise UserError(f"{path}: every image is missing under {root}")
    return out


def _check_root(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    return root


def _read_json(path: Path):
    if not path.is_file():
        raise UserError(f"caption file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (expected UTF-8 JSON)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def _karpathy_entry(path: Path, i: int, item) -> tuple[str, str, list[str]]:
    def bad(what: str) -> UserError:
        return UserError(f"{path}: images[{i}] is not in Karpathy format: {what}")

    if not isinstance(item, dict):
        raise bad(f"expected an object, got {type(item).__name__}")
    for key, kind in (("filename", str), ("split", str), ("sentences", list)):
        if not isinstance(item.get(key), kind):
            raise bad(f"missing or invalid {key!r}")
    captions = []
    for j, sentence in enumerate(item["sentences"]):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if raw is None and isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
            raw = " ".join(map(str, sentence["tokens"]))
        if not isinstance(raw, str):
            raise bad(f"sentences[{j}] has no 'raw' text")
        captions.append(raw)
    return item["filename"], item["split"], captions


def _caption_rows(path: Path):
    """Yield (where, image, caption) from any supported captions file."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        yield from _table_rows(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
                yield from _object_rows(path, f"line {n}", obj)
    elif suffix == ".json":
        data = _read_json(path)
        if isinstance(data, dict):
            for image, caps in data.items():
                for cap in caps if isinstance(caps, list) else [caps]:
                    yield f"key {image!r}", image, cap
        elif isinstance(data, list):
            for n, obj in enumerate(data):
                yield from _object_rows(path, f"item {n}", obj)
        else:
            raise UserError(f"{path}: expected a list of objects or an object mapping image → captions")
    else:
        raise UserError(f"{path}: unsupported captions file type {suffix!r} (use .csv, .tsv, .txt, .json, .jsonl)")


def _pick(keys, candidates, path, what):
    found = next((k for k in keys if k.strip().lower() in candidates), None)
    if found is None:
        raise UserError(f"{path}: no {what} column (one of {', '.join(candidates)}); columns: {', '.join(keys)}")
    return found


def _table_rows(path: Path, delimiter: str):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        keys = reader.fieldnames or []
        image_key = _pick(keys, _IMAGE_COLUMNS, path, "image")
        caption_key = _pick(keys, _CAPTION_COLUMNS, path, "caption")
        for row in reader:
            yield f"line {reader.line_num}", row.get(image_key), row.get(caption_key)


def _object_rows(path: Path, where: str, obj):
    if not isinstance(obj, dict):
        raise UserError(f"{path}: {where}: expected an object with an image and a caption")
    image = next((obj[k] for k in _IMAGE_COLUMNS if k in obj), None)
    caps = next((obj[k] for k in _CAPTION_COLUMNS if k in obj), None)
    for cap in caps if isinstance(caps, list) else [caps]:
        yield where, image, cap

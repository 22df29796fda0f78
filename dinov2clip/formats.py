"""The image files dinov2clip reads, by extension, and the one folder walker: for every front-end (folders
given to `embed`, `quickstart`, `index` and `fit`, image members of webdataset shards). No torch, no PIL."""
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".ppm")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def images_under(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, sorted. A broken symlink is kept: reading it fails, and it
    is named and counted like any unreadable image."""
    return sorted(p for p in Path(folder).rglob("*") if is_image_name(p.name) and (p.is_file() or p.is_symlink()))

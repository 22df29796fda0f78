"""The image files dinov2clip reads, by extension: one list for every front-end (folders given to `embed`,
`quickstart` and `index`, image members of webdataset shards). Light module: no torch, no PIL."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".ppm")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)

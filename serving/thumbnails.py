"""Thumbnails: small JPEGs of stored images, made on first request and cached on disk.

Cache layout, under the store folder: `thumbnails/<id[:2]>/<key>.jpg`, where the key is a hash
of the image id, the file's size and mtime and the thumbnail size. A changed file therefore
gets a new key (and a new ETag) instead of a stale picture; old keys of the same id are
removed when a new one is written. The key is also the ETag: the HTTP side answers
`If-None-Match` with 304 and lets browsers cache for a day (the URL's content only changes
with the file, and then the ETag changes too).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from PIL import Image

from data.images import MAX_IMAGE_PIXELS, ImageLoadError, load_image
from serving.errors import GalleryError, not_found

THUMBNAIL_DIR = "thumbnails"
DEFAULT_SIZE = 256
MEDIA_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".bmp": "image/bmp",
    ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff",
}


def media_type(path: str | Path) -> str:
    return MEDIA_TYPES.get(Path(path).suffix.lower(), "application/octet-stream")


def file_etag(path: str | Path) -> tuple[str, os.stat_result]:
    """A validator for a file's current content (size and mtime), and its stat."""
    try:
        stat = os.stat(path)
    except OSError:
        raise not_found(f"the image file is no longer readable: {path}") from None
    digest = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    return digest, stat


class ThumbnailCache:
    def __init__(self, folder: str | Path, size: int = DEFAULT_SIZE, quality: int = 82,
                 max_pixels: int = MAX_IMAGE_PIXELS):
        self.folder = Path(folder)
        self.size = int(size)
        self.quality = int(quality)
        self.max_pixels = max_pixels
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def get(self, record_id: str, source: str) -> tuple[Path, str]:
        """(thumbnail path, ETag) for the image at `source`, made now if not cached."""
        version, _ = file_etag(source)
        key = hashlib.sha256(f"{record_id}|{version}|{self.size}".encode()).hexdigest()[:24]
        target = self.folder / record_id[:2] / f"{record_id}-{key}.jpg"
        if target.is_file():
            return target, key
        with self._lock(record_id):
            if not target.is_file():
                self._make(source, target)
                for old in target.parent.glob(f"{record_id}-*.jpg"):  # older versions of this image
                    if old != target:
                        old.unlink(missing_ok=True)
        return target, key

    def _make(self, source: str, target: Path) -> None:
        try:
            image = load_image(source, min_size=self.size, max_pixels=self.max_pixels)
        except ImageLoadError as error:
            from serving.ingest import image_load_error

            raise image_load_error(error) from None
        image.thumbnail((self.size, self.size), Image.LANCZOS)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            image.save(tmp, format="JPEG", quality=self.quality, optimize=True)
            os.replace(tmp, target)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise GalleryError(500, f"cannot write the thumbnail cache: {error}") from None

    def remove(self, record_id: str) -> None:
        for old in (self.folder / record_id[:2]).glob(f"{record_id}-*.jpg"):
            old.unlink(missing_ok=True)

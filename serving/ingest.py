"""Adding images: walk folders, hash, decode and embed in batches, store without duplicates.

Pipeline: a thread pool decodes files (read, SHA-256, `load_image` with JPEG draft, the
checkpoint's transform) up to `prefetch_batches` batches ahead, while the calling thread runs
the model on the current batch and writes it to the store. PIL decoding, resizing, file reads
and hashing release the GIL, so decoding and inference overlap on all cores.

Identity rules (per user):
- A record is one resolved path (its id is a hash of that path). Re-adding a path whose size
  and mtime are unchanged is a no-op without reading the file; if they changed but the
  content hash is the same, only the metadata is refreshed; if the content changed, the
  image is re-embedded ("updated").
- An image is never stored twice: a file whose content hash is already stored under another
  path that still exists is reported as a duplicate (`duplicate_of`) and NOT stored. If that
  other path no longer exists, the file was moved: the new path replaces the old record.
- Files that fail are listed with the reason; the rest of the batch is stored.
- Each batch is written with one upsert while holding the user's write lock, so concurrent
  adds cannot both store the same content, and a crash leaves only whole records.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from data.images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, ImageLoadError, is_image_file, load_image
from serving.errors import GalleryError, bad_request, forbidden, not_found
from serving.memory import release_free_memory
from serving.paths import PathPolicy
from serving.priority import lower_thread_priority
from serving.store import GalleryStore, ImageRecord, User, image_id

MAX_LISTED = 1000  # failed/duplicate/removed files listed in an answer (the counts stay exact)
MAX_FILE_BYTES = 512 * 1024 * 1024  # larger files are refused before a byte is read (a 1 GB file was read whole)

logger = logging.getLogger(__name__)


class IngestCancelled(RuntimeError):
    """The server is shutting down; batches already stored stay stored."""


@dataclass
class FileEntry:
    path: str       # resolved
    size: int
    mtime_ns: int

    @property
    def id(self) -> str:
        return image_id(self.path)


@dataclass
class Decoded:
    entry: FileEntry
    sha256: str = ""
    pixels: object = None
    error: GalleryError | None = None


@dataclass
class IngestReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    ignored: int = 0
    duplicates: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    removed: list[dict] = field(default_factory=list)  # {"id", "path"} of records whose file left the folder
    outcomes: dict[str, dict] = field(default_factory=dict)  # image id -> {"status", ...}

    def fail(self, path: str, error: GalleryError, image_id_: str | None = None) -> None:
        self.failures.append({"path": str(path), "reason": error.detail, "status": error.status_code})
        if image_id_:
            self.outcomes[image_id_] = {"status": "failed", "error": error}

    def as_dict(self) -> dict:
        return {
            "added": self.added, "updated": self.updated, "unchanged": self.unchanged,
            "duplicates": len(self.duplicates), "failed": len(self.failures), "ignored": self.ignored,
            "removed": len(self.removed), "duplicate_files": self.duplicates[:MAX_LISTED],
            "failed_files": self.failures[:MAX_LISTED], "removed_files": self.removed[:MAX_LISTED],
        }


# ---------------------------------------------------------------------------- files


def image_load_error(error: ImageLoadError) -> GalleryError:
    """Map `data.images.load_image`'s reasons to HTTP statuses."""
    status = {"missing": 404, "not_a_file": 400, "too_large": 413, "not_an_image": 415}.get(error.kind, 422)
    return GalleryError(status, str(error))  # 422: corrupt or truncated


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes in a file name (surrogate escapes)
        return False


def stat_file(resolved: Path) -> FileEntry:
    """A file a request names directly: 404 missing, 400 not a file, 415 not an image type."""
    if not _utf8(str(resolved)):
        raise bad_request("file name is not valid UTF-8; rename it to add it")
    try:
        stat = resolved.stat()
    except FileNotFoundError:
        raise not_found(f"no such file: {resolved}") from None
    except PermissionError:
        raise forbidden(f"the server process may not read {resolved}") from None
    except OSError as error:
        raise bad_request(f"cannot stat {resolved}: {error}") from None
    if not resolved.is_file():
        raise bad_request(f"not a regular file (is it a folder? use /images/add-folder): {resolved}")
    if not is_image_file(resolved):
        raise GalleryError(415, f"unsupported file type {resolved.suffix or '(none)'!r}: {resolved}; "
                                f"supported: {', '.join(IMAGE_EXTENSIONS)}")
    return FileEntry(str(resolved), stat.st_size, stat.st_mtime_ns)


def scan_folder(folder: Path, policy: PathPolicy, report: IngestReport, skip: Path | None = None) -> list[FileEntry]:
    """Image files under `folder` (sub-folders included; folder symlinks are not followed).

    `skip` is a folder never walked into nor taken files from, even through a file symlink:
    the gallery store's own folder (thumbnails, other galleries' uploads)."""
    entries: dict[str, FileEntry] = {}
    skip_text = str(skip) if skip is not None else None

    def on_error(error: OSError):
        report.fail(error.filename or str(folder), bad_request(f"cannot list folder: {error.strerror}"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=on_error, followlinks=False):
        if skip_text is not None:
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) != skip_text]
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not is_image_file(path):
                report.ignored += 1
                continue
            if not _utf8(str(path)):
                report.fail(repr(str(path))[1:-1], bad_request("file name is not valid UTF-8; rename it to add it"))
                continue
            resolved = policy.check_file(path)
            if isinstance(resolved, GalleryError):
                report.fail(str(path), resolved)
                continue
            if skip is not None and resolved.is_relative_to(skip):
                report.fail(str(path), forbidden(f"{path} resolves into the gallery store folder {skip}"))
                continue
            try:
                stat = resolved.stat()
            except OSError as error:
                report.fail(str(path), bad_request(f"cannot stat: {error.strerror}"))
                continue
            if not resolved.is_file():
                report.ignored += 1
                continue
            entries.setdefault(str(resolved), FileEntry(str(resolved), stat.st_size, stat.st_mtime_ns))
    return list(entries.values())


def decode_file(entry: FileEntry, transform: Callable, min_size: int, max_pixels: int) -> Decoded:
    if entry.size == 0:
        return Decoded(entry, error=GalleryError(422, f"empty file: {entry.path}"))
    if entry.size > MAX_FILE_BYTES:
        return Decoded(entry, error=GalleryError(413, f"file too large ({entry.size} bytes, limit {MAX_FILE_BYTES}): "
                                                      f"{entry.path}"))
    try:
        with open(entry.path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        image = load_image(entry.path, min_size=min_size, max_pixels=max_pixels)
        return Decoded(entry, digest, transform(image))
    except ImageLoadError as error:
        return Decoded(entry, error=image_load_error(error))
    except FileNotFoundError:
        return Decoded(entry, error=not_found(f"no such file: {entry.path}"))
    except PermissionError:
        return Decoded(entry, error=forbidden(f"the server process may not read {entry.path}"))
    except OSError as error:
        return Decoded(entry, error=bad_request(f"cannot read {entry.path}: {error}"))
    except Exception as error:  # a decoder bug must not fail the whole folder
        logger.exception("decoding %s failed", entry.path)
        return Decoded(entry, error=GalleryError(422, f"cannot decode {entry.path}: {error}"))


class DecodePipeline:
    """Decode `entries` on `workers` threads, keeping `prefetch_batches` batches in flight."""

    def __init__(self, decode: Callable[[FileEntry], Decoded], workers: int, batch_size: int, prefetch_batches: int):
        self.decode = decode
        self.workers = max(1, workers)
        self.batch_size = max(1, batch_size)
        self.window = self.batch_size * (max(0, prefetch_batches) + 1)

    def run(self, entries: Iterable[FileEntry]) -> Iterator[list[Decoded]]:
        # Decoding is ingest work: below searches in CPU priority (serving/priority.py).
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decode", initializer=lower_thread_priority)
        pending: deque = deque()
        source = iter(entries)

        def fill():
            while len(pending) < self.window:
                entry = next(source, None)
                if entry is None:
                    return
                pending.append(pool.submit(self.decode, entry))

        try:
            fill()
            while pending:
                batch = []
                while pending and len(batch) < self.batch_size:
                    batch.append(pending.popleft().result())
                    fill()
                yield batch
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------- ingest


class Ingestor:
    def __init__(self, store: GalleryStore, embedder, policy: PathPolicy, batch_size: int = 32,
                 decode_workers: int = 2, prefetch_batches: int = 2, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 stop: threading.Event | None = None):
        self.store = store
        self.embedder = embedder
        self.policy = policy
        self.stop = stop or threading.Event()
        self.max_image_pixels = max_image_pixels
        self.pipeline = DecodePipeline(self._decode, decode_workers, batch_size, prefetch_batches)

    def _decode(self, entry: FileEntry) -> Decoded:
        return decode_file(entry, self.embedder.transform, self.embedder.preprocessing.image_size, self.max_image_pixels)

    def _check_stop(self, cancel: threading.Event | None = None):
        if self.stop.is_set():
            raise IngestCancelled("the server is shutting down; the batches stored so far are kept")
        if cancel is not None and cancel.is_set():
            raise IngestCancelled("cancelled; the batches stored so far are kept")

    def ingest(self, user: User, entries: list[FileEntry], report: IngestReport,
               progress: Callable[[int], None] | None = None, cancel: threading.Event | None = None) -> IngestReport:
        """Add `entries` batch by batch. `progress(n)` is called with the number of files handled
        (unchanged ones first, then after each stored batch); `cancel` stops between batches."""
        existing = self.store.get_records(user, [e.id for e in entries])
        todo = []
        for entry in entries:
            record = existing.get(entry.id)
            if record is not None and record.size == entry.size and record.mtime_ns == entry.mtime_ns:
                report.unchanged += 1
                report.outcomes[entry.id] = {"status": "unchanged", "record": record}
            else:
                todo.append(entry)
        if progress is not None and len(entries) > len(todo):
            progress(len(entries) - len(todo))
        self._check_stop(cancel)
        for batch in self.pipeline.run(todo):
            self._check_stop(cancel)
            with self.store.user_lock(user.user_id):
                self._store_batch(user, batch, report)
            if progress is not None:
                progress(len(batch))
        if todo:
            release_free_memory()  # the decoded images and batches are freed by now (serving/memory.py)
        return report

    def _store_batch(self, user: User, batch: list[Decoded], report: IngestReport) -> None:
        good = []
        for item in batch:
            if item.error is not None:
                report.fail(item.entry.path, item.error, item.entry.id)
            else:
                good.append(item)
        if not good:
            return
        user = self.store.get_user(user.user_id)  # a re-index may have switched its collection
        current = self.store.get_records(user, [d.entry.id for d in good])
        by_hash = self.store.find_by_hashes(user, [d.sha256 for d in good])
        stored_now: dict[str, ImageRecord] = {}
        to_embed: list[tuple[ImageRecord, object, str]] = []
        refresh, stale = [], []
        now = time.time()
        for item in good:
            entry, previous = item.entry, current.get(item.entry.id)
            record = ImageRecord(entry.id, entry.path, entry.size, entry.mtime_ns, item.sha256, now)
            if previous is not None and previous.sha256 == item.sha256:
                record.added_at = previous.added_at
                refresh.append(record)  # touched, same content: keep the embedding
                report.unchanged += 1
                report.outcomes[entry.id] = {"status": "unchanged", "record": record}
                continue
            owner = stored_now.get(item.sha256)
            if owner is None:
                others = [r for r in by_hash.get(item.sha256, []) if r.id != entry.id]
                live = [r for r in others if os.path.exists(r.path)]
                if live:
                    owner = live[0]
                else:
                    stale.extend(r.id for r in others)  # moved: the old path is gone
            if owner is not None:
                report.duplicates.append({"path": entry.path, "duplicate_of": owner.path, "duplicate_of_id": owner.id})
                report.outcomes[entry.id] = {"status": "duplicate", "duplicate_of": owner}
                if previous is not None:
                    stale.append(entry.id)  # this path's old content is gone; its new content is stored elsewhere
                continue
            status = "updated" if previous is not None else "added"
            to_embed.append((record, item.pixels, status))
            stored_now[item.sha256] = record
        if to_embed:
            vectors = self.embedder.embed_images([pixels for _, pixels, _ in to_embed])
            # Write order: new records first, then deletions, so a crash can only leave an extra
            # copy for a moment, never lose an image.
            self.store.upsert(user, [r for r, _, _ in to_embed], vectors)
            for record, _, status in to_embed:
                setattr(report, status, getattr(report, status) + 1)
                report.outcomes[record.id] = {"status": status, "record": record}
        self.store.update_metadata(user, refresh)
        self.store.delete(user, stale)

    def rebuild(self, user: User, new_collection, report: IngestReport) -> int:
        """Re-embed every stored image of `user` into `new_collection` (re-index after a model change)."""
        done = 0
        for records in self.store.iter_records(user):
            entries = []
            for record in records:
                path = Path(record.path)
                if not self.policy.allows(path.resolve()):
                    report.fail(record.path, forbidden("outside the allowed roots; not re-indexed, removed"))
                    continue
                try:
                    stat = path.stat()
                except OSError as error:
                    report.fail(record.path, not_found(f"cannot read ({error.strerror}); not re-indexed, removed"))
                    continue
                entries.append(FileEntry(record.path, stat.st_size, stat.st_mtime_ns))
            added_at = {r.id: r.added_at for r in records}
            for batch in self.pipeline.run(entries):
                self._check_stop()
                good = []
                for item in batch:
                    if item.error is not None:
                        report.fail(item.entry.path, GalleryError(item.error.status_code,
                                                                  f"{item.error.detail}; not re-indexed, removed"))
                    else:
                        good.append(item)
                if not good:
                    continue
                vectors = self.embedder.embed_images([d.pixels for d in good])
                new_records = [ImageRecord(d.entry.id, d.entry.path, d.entry.size, d.entry.mtime_ns, d.sha256,
                                           added_at.get(d.entry.id, time.time())) for d in good]
                self.store.upsert(user, new_records, vectors, collection=new_collection)
                done += len(new_records)
        report.updated = done
        return done


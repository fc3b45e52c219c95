"""The gallery service: every operation of the API as a plain method, without HTTP.

It runs inside the one process that owns the store (the LitServe inference worker, or the
re-index CLI). Methods take validated values and return dicts shaped like the response models
in `serving.schemas`; failures raise `GalleryError(status, detail)`.

Model identity: every collection records the model id of the checkpoint that embedded it.
Searching or adding to a collection embedded by another model would compare vectors from two
different spaces, so it answers 409 with what to do (re-index, or serve the other checkpoint).
An empty collection simply adopts the server's model. Listing and deleting still work.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from serving.config import ServeSettings
from serving.errors import GalleryError, bad_request, conflict, forbidden, not_found
from serving.ingest import FileEntry, IngestReport, Ingestor, decode_file, scan_folder, stat_file
from serving.jobs import JobManager
from serving.paths import PathPolicy
from serving.schemas import DEFAULT_NEGATIVE_WEIGHT, DEFAULT_TOP_K, MAX_LIST_LIMIT, MAX_OFFSET, MAX_TOP_K
from serving.store import GalleryStore, UnknownUserError, User
from serving.thumbnails import THUMBNAIL_DIR, ThumbnailCache, file_etag, media_type

logger = logging.getLogger(__name__)

OPERATIONS = ("initialize", "add_image", "add_folder", "search", "list_images", "delete_image", "reindex", "info",
              "image_info", "image_file", "thumbnail", "search_by_image", "upload", "add_folder_job", "job",
              "cancel_job", "prune", "export_backup")
MAX_PRUNE_LISTED = 1000
UPLOAD_DIR = "uploads"
TMP_DIR = "tmp"
UPLOAD_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif",
                  "MPO": ".jpg"}


def split_negatives(query: str, negative: str | None = None) -> tuple[str, list[str]]:
    """`"beach -people -dog"` -> ("beach", ["people", "dog"]); `negative` is one more negative text.

    A token is negative when it starts with one `-` followed by a letter or digit, so "t-shirt",
    "-" and "--" stay in the query as written."""
    positive, negatives = [], []
    for token in query.split():
        if re.match(r"^-[^\W_]", token):
            negatives.append(token[1:])
        else:
            positive.append(token)
    if negative and negative.strip():
        negatives.append(negative.strip())
    return " ".join(positive), negatives


def _normalise(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def _safe_stem(filename: str | None) -> str:
    stem = Path(filename or "").stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:60]
    return stem or "upload"


class Gallery:
    def __init__(self, store: GalleryStore, embedder, policy: PathPolicy, settings: ServeSettings,
                 stop: threading.Event | None = None):
        self.store = store
        self.embedder = embedder
        self.policy = policy
        self.model_id = embedder.model_id
        self.stop = stop or threading.Event()
        self.max_upload_bytes = int(settings.max_upload_bytes)
        self.uploads_dir = store.path / UPLOAD_DIR
        self.tmp_dir = store.path / TMP_DIR
        self.thumbnails = ThumbnailCache(store.path / THUMBNAIL_DIR, settings.thumbnail_size,
                                         max_pixels=settings.ingest.max_image_pixels)
        self.jobs = JobManager()
        ingest = settings.ingest
        self.ingestor = Ingestor(
            store, embedder, policy, batch_size=ingest.batch_size,
            decode_workers=ingest.decode_workers or settings.cores, prefetch_batches=ingest.prefetch_batches,
            max_image_pixels=ingest.max_image_pixels, stop=self.stop,
        )

    @classmethod
    def open(cls, settings: ServeSettings, stop: threading.Event | None = None) -> "Gallery":
        from serving.embedder import Embedder

        store = GalleryStore(settings.db_dir, **vars(settings.index), backend=settings.store,
                             query_batch=settings.search.max_batch)
        try:
            embedder = Embedder(settings.checkpoint, settings.device, settings.bf16,
                                settings.torch_threads or settings.cores, max_batch=settings.search.max_batch,
                                text_threads=settings.search.text_threads)
        except BaseException:
            store.close()
            raise
        roots = list(settings.allowed_roots)
        if roots:  # uploads are files the server itself wrote: always readable
            roots.append(str(store.path / UPLOAD_DIR))
            (store.path / UPLOAD_DIR).mkdir(exist_ok=True)
        gallery = cls(store, embedder, PathPolicy(roots), settings, stop)
        gallery.warn_mismatched()
        return gallery

    def close(self) -> None:
        self.stop.set()
        self.jobs.shutdown()
        close = getattr(self.embedder, "close", None)
        if close:
            close()
        self.store.close()

    def dispatch(self, request: dict) -> dict:
        op = request.get("op") if isinstance(request, dict) else None
        if op not in OPERATIONS:
            raise bad_request(f"unknown operation {op!r}")
        started = time.perf_counter()
        result = getattr(self, op)(**request.get("args", {}))
        logger.info("%s done in %.3f s", op, time.perf_counter() - started)
        return result

    # ---------------------------------------------------------------- helpers

    def _user(self, user_id: str) -> User:
        try:
            return self.store.get_user(user_id)
        except UnknownUserError:
            raise not_found("unknown user_id; create a gallery with POST /db/initialize {\"user_name\": ...}") from None

    def mismatch_message(self, user: User, stored: str) -> str:
        return (
            f"gallery {user.user_name!r} holds embeddings of model {stored}, but this server runs model "
            f"{self.model_id}; vectors of different models cannot be compared or mixed. Re-index it with the "
            f"current model (POST /db/reindex?user_id=..., or `python -m serving.reindex checkpoint=...` while "
            f"the server is stopped), or start the server with the checkpoint of model {stored}."
        )

    def _require_model(self, user: User) -> None:
        stored = self.store.model_id(user)
        if stored == self.model_id:
            return
        with self.store.user_lock(user.user_id):
            if self.store.count(user) == 0:
                self.store.set_model_id(user, self.model_id)
                return
        raise conflict(self.mismatch_message(user, stored))

    def warn_mismatched(self) -> list[User]:
        mismatched = [u for u in self.store.users() if self.store.model_id(u) != self.model_id and self.store.count(u)]
        for user in mismatched:
            logger.warning("%s", self.mismatch_message(user, self.store.model_id(user)))
        return mismatched

    def _describe(self, user: User, created: bool | None = None) -> dict:
        stored = self.store.model_id(user)
        images = self.store.count(user)
        out = {
            "user_id": user.user_id, "user_name": user.user_name, "model_id": stored,
            "server_model_id": self.model_id, "needs_reindex": bool(images) and stored != self.model_id,
            "images": images,
        }
        if created is not None:
            out["created"] = created
        return out

    # ---------------------------------------------------------------- operations

    def initialize(self, user_name: str) -> dict:
        if not isinstance(user_name, str) or not user_name.strip():
            raise bad_request("user_name is empty")
        user, created = self.store.get_or_create_user(user_name, self.model_id)
        if created:
            logger.info("created gallery %r", user_name)
        return self._describe(user, created)

    def info(self, user_id: str) -> dict:
        return self._describe(self._user(user_id))

    def add_image(self, user_id: str, image_path: str) -> dict:
        user = self._user(user_id)
        self._require_model(user)
        entry = stat_file(self._resolve_file(user, image_path, "image_path"))
        report = self.ingestor.ingest(user, [entry], IngestReport())
        outcome = report.outcomes[entry.id]
        if outcome["status"] == "failed":
            raise outcome["error"]
        owner = outcome.get("duplicate_of")
        return {
            "status": outcome["status"], "id": entry.id, "path": entry.path,
            "duplicate_of": {"id": owner.id, "path": owner.path} if owner else None,
        }

    def add_folder(self, user_id: str, folder_path: str) -> dict:
        user = self._user(user_id)
        self._require_model(user)
        folder = self._folder(folder_path)
        started = time.perf_counter()
        report = IngestReport()
        entries = self.scan(folder, report)
        self.ingestor.ingest(user, entries, report)
        self.remove_gone(user, folder, entries, report)
        seconds = time.perf_counter() - started
        out = report.as_dict()
        out["seconds"] = round(seconds, 4)
        out["images_per_second"] = round((report.added + report.updated) / seconds, 2) if seconds > 0 else 0.0
        logger.info("add-folder %s: %d added, %d updated, %d unchanged, %d duplicates, %d failed in %.1f s",
                    folder, report.added, report.updated, report.unchanged, len(report.duplicates),
                    len(report.failures), seconds)
        return out

    def _folder_filter(self, folder: str | None) -> str | None:
        return str(self.policy.resolve(folder, "folder")) if folder else None

    def _ranked(self, user: User, vector: np.ndarray, top_k: int, offset: int, min_score: float | None,
                folder: str | None, exclude: str | None = None) -> tuple[list[dict], int, int]:
        """One page of the images nearest to `vector` (leaving out the image `exclude`), and how
        many nearer records were skipped because their file is gone from the disk (a search never
        names a file the server can see is gone; prune or re-adding the folder removes them)."""
        if not 1 <= int(top_k) <= MAX_TOP_K or not 0 <= int(offset) <= MAX_OFFSET:
            raise GalleryError(422, f"top_k must be 1..{MAX_TOP_K} and offset 0..{MAX_OFFSET}")
        folder_path = self._folder_filter(folder)
        total = self.store.count(user)
        results, missing = [], 0
        if total:
            wanted = offset + top_k
            asked = min(wanted + (1 if exclude else 0), total)
            for _ in range(3):  # ask for more while gone files leave the page short (bounded)
                hits = self.store.query(user, vector, asked, folder=folder_path)
                present = [hit for hit in hits if hit[0].id != exclude and os.path.isfile(hit[0].path)]
                missing = sum(1 for hit in hits if hit[0].id != exclude) - len(present)
                if len(present) >= wanted or asked >= total or not missing:
                    break
                asked = min(total, asked * 2 + missing)
            for rank, (record, score) in enumerate(present[offset:offset + top_k], start=offset + 1):
                if min_score is not None and score < min_score:
                    break
                results.append({"rank": rank, "id": record.id, "path": record.path, "score": score})
        return results, total, missing

    def search(self, user_id: str, query: str, top_k: int = DEFAULT_TOP_K, offset: int = 0,
               min_score: float | None = None, folder: str | None = None, negative: str | None = None,
               negative_weight: float = DEFAULT_NEGATIVE_WEIGHT) -> dict:
        """Text search. Negative terms (`-word` in the query, or `negative`) are subtracted rclip
        style: q' = normalise(q - w * n), with n the normalised mean of the negative texts'
        embeddings and w = `negative_weight`, so images close to them rank lower."""
        if not isinstance(query, str) or not query.strip():
            raise GalleryError(422, "query is empty")
        positive, negatives = split_negatives(query, negative)
        if not positive:
            raise GalleryError(422, "the query has only negative terms (-word); say what to look for too")
        if not 0.0 <= float(negative_weight) <= 2.0:
            raise GalleryError(422, "negative_weight must be 0..2")
        if not 1 <= int(top_k) <= MAX_TOP_K or not 0 <= int(offset) <= MAX_OFFSET:
            raise GalleryError(422, f"top_k must be 1..{MAX_TOP_K} and offset 0..{MAX_OFFSET}")
        user = self._user(user_id)
        self._require_model(user)
        results, total, missing = [], self.store.count(user), 0
        if not total:
            self._folder_filter(folder)  # the same validation as with images
        else:
            vector = _normalise(self.embedder.embed_query(positive))
            if negatives and negative_weight > 0:
                away = _normalise(np.mean([_normalise(self.embedder.embed_query(t)) for t in negatives], axis=0))
                vector = _normalise(vector - float(negative_weight) * away)
            results, total, missing = self._ranked(user, vector, top_k, offset, min_score, folder)
        return {"query": query, "negative_terms": negatives, "results": results, "top_k": top_k, "offset": offset,
                "total_images": total, "model_id": self.model_id, "missing_skipped": missing}

    # ---------------------------------------------------------------- images by id

    def _record(self, user: User, image_id: str):
        record = self.store.get_records(user, [image_id]).get(image_id) if isinstance(image_id, str) else None
        if record is None:  # another gallery's id answers the same: ids are not confirmed
            raise not_found(f"no image with id {image_id!r} in this gallery")
        return record

    def _readable(self, record) -> Path:
        path = Path(record.path)
        if not self.policy.allows(path.resolve()):
            raise forbidden(f"{record.path} is outside the folders this server may read now")
        return path

    def image_info(self, user_id: str, image_id: str) -> dict:
        user = self._user(user_id)
        record = self._record(user, image_id)
        out = {**record.public(), "modified_at": record.mtime_ns / 1e9, "width": None, "height": None,
               "media_type": media_type(record.path), "exists": os.path.isfile(record.path)}
        if out["exists"]:
            try:
                from PIL import Image

                with Image.open(record.path) as image:
                    out["width"], out["height"] = image.size
            except Exception:  # the header is unreadable now; the record stays as it is
                pass
        return out

    def image_file(self, user_id: str, image_id: str) -> dict:
        user = self._user(user_id)
        record = self._record(user, image_id)
        path = self._readable(record)
        etag, stat = file_etag(path)
        return {"path": str(path), "media_type": media_type(path), "etag": etag, "size": stat.st_size}

    def thumbnail(self, user_id: str, image_id: str) -> dict:
        user = self._user(user_id)
        record = self._record(user, image_id)
        path = self._readable(record)
        thumb, etag = self.thumbnails.get(record.id, str(path))
        return {"path": str(thumb), "media_type": "image/jpeg", "etag": etag}

    # ---------------------------------------------------------------- search by image, upload

    def _write_tmp(self, data: bytes) -> Path:
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise GalleryError(422, "the uploaded file is empty")
        if len(data) > self.max_upload_bytes:
            raise GalleryError(413, f"uploaded file too large ({len(data)} bytes, limit {self.max_upload_bytes})")
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.upload"
        tmp.write_bytes(data)
        return tmp

    def _decode_tmp(self, tmp: Path, shown: str):
        """(pixels, PIL format) of an uploaded file, or its 413/415/422 with the name the user sent."""
        stat = tmp.stat()
        decoded = decode_file(FileEntry(str(tmp), stat.st_size, stat.st_mtime_ns), self.embedder.transform,
                              self.embedder.preprocessing.image_size, self.ingestor.max_image_pixels)
        if decoded.error is not None:
            raise GalleryError(decoded.error.status_code, decoded.error.detail.replace(str(tmp), shown))
        from PIL import Image

        with Image.open(tmp) as image:
            fmt = image.format
        return decoded, fmt

    def search_by_image(self, user_id: str, image_id: str | None = None, image_path: str | None = None,
                        data: bytes | None = None, filename: str | None = None, top_k: int = DEFAULT_TOP_K,
                        offset: int = 0, min_score: float | None = None, folder: str | None = None) -> dict:
        """Images nearest to a stored image (itself left out), a file on the server, or an upload."""
        given = [name for name, value in (("image_id", image_id), ("image_path", image_path), ("file", data))
                 if value is not None]
        if len(given) != 1:
            raise GalleryError(422, "give exactly one of image_id, image_path or an uploaded file (multipart field 'file')")
        user = self._user(user_id)
        self._require_model(user)
        exclude = None
        if image_id is not None:
            self._record(user, image_id)
            vector = self.store.get_embedding(user, image_id)
            if vector is None:
                raise not_found(f"no image with id {image_id!r} in this gallery")
            query, exclude = f"image:{image_id}", image_id
        elif image_path is not None:
            entry = stat_file(self._resolve_file(user, image_path, "image_path"))
            decoded = decode_file(entry, self.embedder.transform, self.embedder.preprocessing.image_size,
                                  self.ingestor.max_image_pixels)
            if decoded.error is not None:
                raise decoded.error
            vector = self.embedder.embed_images([decoded.pixels])[0]
            query = f"path:{entry.path}"
        else:
            shown = filename or "upload"
            tmp = self._write_tmp(data)
            try:
                decoded, _ = self._decode_tmp(tmp, shown)
            finally:
                tmp.unlink(missing_ok=True)
            vector = self.embedder.embed_images([decoded.pixels])[0]
            query = f"upload:{shown}"
        results, total, missing = self._ranked(user, _normalise(vector), top_k, offset, min_score, folder, exclude)
        return {"query": query, "negative_terms": [], "results": results, "top_k": top_k, "offset": offset,
                "total_images": total, "model_id": self.model_id, "missing_skipped": missing}

    def upload(self, user_id: str, data: bytes, filename: str | None = None) -> dict:
        """Save an uploaded image under uploads/<user_id>/ in the store folder, then add it.

        The file is named by its content (sha256 prefix) and its original name; the extension
        follows the decoded format. 413 too large, 415 not an image, 422 corrupt or empty."""
        user = self._user(user_id)
        self._require_model(user)
        shown = filename or "upload"
        tmp = self._write_tmp(data)
        try:
            _, fmt = self._decode_tmp(tmp, shown)
            extension = UPLOAD_FORMATS.get(fmt or "")
            if extension is None:
                raise GalleryError(415, f"unsupported image format {fmt} in {shown}; supported: "
                                        f"{', '.join(sorted(set(UPLOAD_FORMATS) - {'MPO'}))}")
            digest = hashlib.sha256(data).hexdigest()
            folder = self.uploads_dir / user.user_id
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{digest[:16]}-{_safe_stem(filename)}{extension}"
            fresh = not target.exists()
            if fresh:
                os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        entry = stat_file(target.resolve())
        report = self.ingestor.ingest(user, [entry], IngestReport())
        outcome = report.outcomes[entry.id]
        owner = outcome.get("duplicate_of")
        if outcome["status"] == "failed" or (owner is not None and fresh):
            target.unlink(missing_ok=True)  # not stored: do not keep the file
        if outcome["status"] == "failed":
            raise outcome["error"]
        return {
            "status": outcome["status"], "id": entry.id, "path": entry.path,
            "duplicate_of": {"id": owner.id, "path": owner.path} if owner else None,
        }

    # ---------------------------------------------------------------- background add-folder

    def _resolve_file(self, user: User, raw: str, what: str) -> Path:
        """A file a request names: the allowed roots apply, and nothing inside the store folder
        may be named but the caller's own uploads (thumbnails, other galleries' uploads)."""
        resolved = self.policy.resolve(raw, what)
        if resolved.is_relative_to(self.store.path) and not resolved.is_relative_to(self.uploads_dir / user.user_id):
            raise forbidden(f"{raw} is inside the gallery store folder; only your own uploads there can be used")
        return resolved

    def scan(self, folder: Path, report: IngestReport) -> list:
        return scan_folder(folder, self.policy, report, skip=self.store.path)

    def _folder(self, folder_path: str) -> Path:
        folder = self.policy.resolve(folder_path, "folder_path")
        if folder.is_relative_to(self.store.path):
            raise forbidden(f"{folder_path} is inside the gallery store folder, which is not a picture folder")
        if not folder.exists():
            raise not_found(f"no such folder: {folder}")
        if not folder.is_dir():
            raise bad_request(f"not a folder (to add one file use /images/add): {folder}")
        return folder

    def remove_gone(self, user: User, folder: Path, entries: list, report: IngestReport) -> None:
        """After a folder walk: remove the records under `folder` whose file is gone from the disk.

        Only records the walk did not meet AND whose path is no longer a file are removed, so a
        file that failed to decode this time, or one the walk skips (the store folder), stays."""
        seen = {entry.id for entry in entries}
        with self.store.user_lock(user.user_id):
            gone = [r for r in self.store.records_under(user, str(folder))
                    if r.id not in seen and not os.path.isfile(r.path)]
            self.store.delete(user, [r.id for r in gone])
        for record in gone:
            self.thumbnails.remove(record.id)
            report.removed.append({"id": record.id, "path": record.path})
        if gone:
            logger.info("removed %d records of files gone from %s", len(gone), folder)

    def prune(self, user_id: str, dry_run: bool = False) -> dict:
        """Check every stored path: remove the records of files gone from the disk (only report
        them with `dry_run`), report files changed since they were indexed and files now outside
        the allowed roots (kept: the roots may be changed back)."""
        user = self._user(user_id)
        started = time.perf_counter()
        checked, missing, found = 0, [], []
        for batch in self.store.iter_records(user):
            for record in batch:
                checked += 1
                try:
                    stat = os.stat(record.path)
                except (FileNotFoundError, NotADirectoryError):
                    missing.append(record)
                    continue
                except OSError:  # unreadable now (permissions): not proof that it is gone
                    continue
                if not os.path.isfile(record.path):
                    missing.append(record)
                elif not self.policy.allows(Path(record.path).resolve()):
                    found.append({"id": record.id, "path": record.path, "reason": "outside_roots"})
                elif stat.st_size != record.size or stat.st_mtime_ns != record.mtime_ns:
                    found.append({"id": record.id, "path": record.path, "reason": "changed"})
        if missing and not dry_run:
            with self.store.user_lock(user.user_id):
                current = self.store.get_records(user, [r.id for r in missing])
                gone = [r for r in current.values() if not os.path.isfile(r.path)]  # not re-added meanwhile
                self.store.delete(user, [r.id for r in gone])
            for record in gone:
                self.thumbnails.remove(record.id)
            missing = gone
        files = [{"id": r.id, "path": r.path, "reason": "missing"} for r in missing] + found
        logger.info("prune %s: %d checked, %d missing (%s), %d changed", user.user_name, checked, len(missing),
                    "reported" if dry_run else "removed", sum(f["reason"] == "changed" for f in found))
        return {"user_id": user.user_id, "checked": checked, "removed": 0 if dry_run else len(missing),
                "changed": sum(f["reason"] == "changed" for f in found), "dry_run": bool(dry_run),
                "files": files[:MAX_PRUNE_LISTED], "seconds": round(time.perf_counter() - started, 4)}

    def export_backup(self, user_id: str) -> dict:
        """Write the gallery's backup (serving/backup.py) to a temporary file that the HTTP answer
        streams and then deletes."""
        from serving.backup import export_gallery

        user = self._user(user_id)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        target = self.tmp_dir / f"export-{uuid.uuid4().hex}.npz"
        summary = export_gallery(self.store, user, target)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", user.user_name).strip("._") or "gallery"
        return {"path": str(target), "filename": f"{safe}.npz", "count": summary["count"]}

    def import_backup(self, data: bytes, user_name: str | None = None, reindex: bool = False) -> dict:
        """Restore an uploaded backup (see serving/backup.py); the caller checks who may."""
        from serving.backup import import_gallery

        tmp = self._write_tmp(data)
        try:
            return import_gallery(self, tmp, name=user_name, reindex=reindex, max_bytes=4 * self.max_upload_bytes)
        finally:
            tmp.unlink(missing_ok=True)

    def add_folder_job(self, user_id: str, folder_path: str) -> dict:
        """Check the request like add_folder, then run it as a background job; returns its id."""
        user = self._user(user_id)
        self._require_model(user)
        folder = self._folder(folder_path)

        def work(job):
            entries = self.scan(folder, job.report)
            job.total = len(entries)
            self.ingestor.ingest(self._user(user_id), entries, job.report, progress=job.advance, cancel=job.cancel)
            self.remove_gone(self._user(user_id), folder, entries, job.report)

        job = self.jobs.submit(user.user_id, "add-folder", str(folder), work)
        return {"job_id": job.job_id, "state": job.state}

    def job(self, user_id: str, job_id: str) -> dict:
        self._user(user_id)
        return self.jobs.get(user_id, job_id).public()

    def cancel_job(self, user_id: str, job_id: str) -> dict:
        self._user(user_id)
        return self.jobs.cancel(user_id, job_id).public()

    def list_images(self, user_id: str, offset: int = 0, limit: int = 100) -> dict:
        if not 1 <= int(limit) <= MAX_LIST_LIMIT or int(offset) < 0:
            raise GalleryError(422, f"limit must be 1..{MAX_LIST_LIMIT} and offset >= 0")
        user = self._user(user_id)
        records = self.store.list_records(user, offset, limit)
        return {"total": self.store.count(user), "offset": offset, "limit": limit,
                "images": [r.public() for r in records]}

    def delete_image(self, user_id: str, image_id: str) -> dict:
        user = self._user(user_id)
        with self.store.user_lock(user.user_id):
            user = self._user(user_id)
            record = self.store.get_records(user, [image_id]).get(image_id)
            if record is None:
                raise not_found(f"no image with id {image_id!r} in this gallery")
            self.store.delete(user, [image_id])
        self.thumbnails.remove(image_id)
        return {"deleted": {"id": record.id, "path": record.path}}

    def reindex(self, user_id: str, force: bool = False) -> dict:
        """Re-embed every stored image with the server's model into a new collection, then switch."""
        self._user(user_id)
        started = time.perf_counter()
        with self.store.user_lock(user_id):
            user = self._user(user_id)
            previous = self.store.model_id(user)
            report = IngestReport()
            skipped = previous == self.model_id and not force
            if not skipped:
                logger.info("re-indexing gallery %r: model %s -> %s", user.user_name, previous, self.model_id)
                new_collection = self.store.begin_rebuild(user, self.model_id)
                try:
                    self.ingestor.rebuild(user, new_collection, report)
                except BaseException:
                    self.store.abort_rebuild(new_collection)
                    raise
                self.store.commit_rebuild(user, new_collection)
        return {
            "user_id": user_id, "model_id": self.model_id, "previous_model_id": previous,
            "reindexed": report.updated, "failed": len(report.failures), "failed_files": report.failures,
            "skipped": skipped, "seconds": round(time.perf_counter() - started, 4),
        }

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

import logging
import threading
import time

from serving.config import ServeSettings
from serving.errors import GalleryError, bad_request, conflict, not_found
from serving.ingest import IngestReport, Ingestor, scan_folder, stat_file
from serving.paths import PathPolicy
from serving.schemas import DEFAULT_TOP_K, MAX_LIST_LIMIT, MAX_OFFSET, MAX_TOP_K
from serving.store import GalleryStore, UnknownUserError, User

logger = logging.getLogger(__name__)

OPERATIONS = ("initialize", "add_image", "add_folder", "search", "list_images", "delete_image", "reindex", "info")


class Gallery:
    def __init__(self, store: GalleryStore, embedder, policy: PathPolicy, settings: ServeSettings,
                 stop: threading.Event | None = None):
        self.store = store
        self.embedder = embedder
        self.policy = policy
        self.model_id = embedder.model_id
        self.stop = stop or threading.Event()
        ingest = settings.ingest
        self.ingestor = Ingestor(
            store, embedder, policy, batch_size=ingest.batch_size,
            decode_workers=ingest.decode_workers or settings.cores, prefetch_batches=ingest.prefetch_batches,
            max_image_pixels=ingest.max_image_pixels, stop=self.stop,
        )

    @classmethod
    def open(cls, settings: ServeSettings, stop: threading.Event | None = None) -> "Gallery":
        from serving.embedder import Embedder

        store = GalleryStore(settings.db_dir, **vars(settings.index))
        try:
            embedder = Embedder(settings.checkpoint, settings.device, settings.bf16,
                                settings.torch_threads or settings.cores)
        except BaseException:
            store.close()
            raise
        gallery = cls(store, embedder, PathPolicy(settings.allowed_roots), settings, stop)
        gallery.warn_mismatched()
        return gallery

    def close(self) -> None:
        self.stop.set()
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
        entry = stat_file(self.policy.resolve(image_path, "image_path"))
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
        folder = self.policy.resolve(folder_path, "folder_path")
        if not folder.exists():
            raise not_found(f"no such folder: {folder}")
        if not folder.is_dir():
            raise bad_request(f"not a folder (to add one file use /images/add): {folder}")
        started = time.perf_counter()
        report = IngestReport()
        entries = scan_folder(folder, self.policy, report)
        self.ingestor.ingest(user, entries, report)
        seconds = time.perf_counter() - started
        out = report.as_dict()
        out["seconds"] = round(seconds, 4)
        out["images_per_second"] = round((report.added + report.updated) / seconds, 2) if seconds > 0 else 0.0
        logger.info("add-folder %s: %d added, %d updated, %d unchanged, %d duplicates, %d failed in %.1f s",
                    folder, report.added, report.updated, report.unchanged, len(report.duplicates),
                    len(report.failures), seconds)
        return out

    def search(self, user_id: str, query: str, top_k: int = DEFAULT_TOP_K, offset: int = 0,
               min_score: float | None = None, folder: str | None = None) -> dict:
        if not isinstance(query, str) or not query.strip():
            raise GalleryError(422, "query is empty")
        if not 1 <= int(top_k) <= MAX_TOP_K or not 0 <= int(offset) <= MAX_OFFSET:
            raise GalleryError(422, f"top_k must be 1..{MAX_TOP_K} and offset 0..{MAX_OFFSET}")
        user = self._user(user_id)
        self._require_model(user)
        folder_path = str(self.policy.resolve(folder, "folder")) if folder else None
        total = self.store.count(user)
        results = []
        if total:
            vector = self.embedder.embed_query(query)
            hits = self.store.query(user, vector, min(offset + top_k, total), folder=folder_path)
            for rank, (record, score) in enumerate(hits[offset:offset + top_k], start=offset + 1):
                if min_score is not None and score < min_score:
                    break
                results.append({"rank": rank, "id": record.id, "path": record.path, "score": score})
        return {"query": query, "results": results, "top_k": top_k, "offset": offset, "total_images": total,
                "model_id": self.model_id}

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

"""The gallery store: one ChromaDB collection per user, embedded or on a Chroma server.

The client and the user registry come from a backend (serving/store_backend.py, the serve
config's `store` group): embedded (below, the default) or a `chroma run` server shared by many
gallery workers, whose registry is a collection of that server and whose folder is not locked.

Layout of the store folder (`db_path`):

    users.json   the user registry: user_id -> user_name and the name of the user's collection
                 (small, rewritten atomically: temp file, fsync, rename)
    chroma/      the ChromaDB persistent client
    .lock        an exclusive `flock` held by the one process that owns the store

Rules this module keeps:
- Exactly one process opens a store folder (the lock): a Chroma process that has loaded an
  index does not see vectors another process adds later, and two processes opening a fresh
  folder at once crashed (DESIGN.md).
- Each collection is cosine space; its metadata records the `model_id` of the checkpoint whose
  embeddings it holds. `ef_search` trades recall for CPU (`scripts/bench_recall.py`); Chroma
  keeps the value an index was loaded with for the life of the process, so a changed setting
  is applied (`collection()`) when the store is opened, before any index is loaded.
- Image ids are a hash of the resolved path, so one path is one record; embeddings are always
  passed (never let Chroma embed documents itself); metadata values are never None.
- Every write is one Chroma upsert/delete per batch (a transaction): a crash leaves whole
  records. Re-indexing fills a new collection and switches the registry to it in one atomic
  rename, so a crash mid-way leaves the old collection in place; collections the registry does
  not name are leftovers of such a crash and are removed when the store opens.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from serving.batching import GroupBatcher
from serving.paths import ancestors
from serving.store_backend import EmbeddedBackend

logger = logging.getLogger(__name__)

REGISTRY_FILE = "users.json"
LOCK_FILE = ".lock"
CHROMA_DIR = "chroma"
COLLECTION_PREFIX = "gallery_"
REGISTRY_VERSION = 1


class StoreLockedError(RuntimeError):
    """Another process owns this store folder."""


class UnknownUserError(KeyError):
    pass


def image_id(resolved_path: str) -> str:
    """Deterministic record id for a resolved path."""
    return hashlib.sha256(os.fsencode(resolved_path)).hexdigest()[:32]


@dataclass
class User:
    user_id: str
    user_name: str
    collection: str
    created_at: float


@dataclass
class ImageRecord:
    id: str
    path: str
    size: int
    mtime_ns: int
    sha256: str
    added_at: float

    def metadata(self) -> dict:
        return {
            "path": self.path,
            "folder": os.path.dirname(self.path),
            "ancestors": ancestors(self.path),  # array metadata: folder filters use $contains
            "size": int(self.size),
            "mtime_ns": int(self.mtime_ns),
            "sha256": self.sha256,
            "added_at": float(self.added_at),
        }

    @classmethod
    def from_metadata(cls, record_id: str, meta: dict) -> "ImageRecord":
        return cls(
            id=record_id, path=meta["path"], size=int(meta.get("size", -1)), mtime_ns=int(meta.get("mtime_ns", -1)),
            sha256=str(meta.get("sha256", "")), added_at=float(meta.get("added_at", 0.0)),
        )

    def public(self) -> dict:
        return {"id": self.id, "path": self.path, "size": self.size, "sha256": self.sha256, "added_at": self.added_at}


class _FolderLock:
    def __init__(self, folder: Path):
        self.file = open(folder / LOCK_FILE, "a+")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise StoreLockedError(
                f"the gallery store {folder} is in use by another process (a running server or re-index); "
                "stop it first, or point db_path at another folder"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self):
        if not self.file.closed:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def make_backend(backend=None):
    """A store backend from None (embedded), a config mapping with `_target_`, or a backend object."""
    if backend is None:
        return EmbeddedBackend()
    if isinstance(backend, dict) or hasattr(backend, "keys"):
        from hydra.utils import instantiate

        return instantiate(dict(backend))
    return backend


class GalleryStore:
    def __init__(self, path: str | Path, ef_search: int = 300, ef_construction: int = 100, max_neighbors: int = 16,
                 backend=None, query_batch: int = 8):
        self.path = Path(path).expanduser().resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.backend = make_backend(backend)
        self._lock = None if self.backend.shared else _FolderLock(self.path)
        self.hnsw = {"space": "cosine", "ef_search": int(ef_search), "ef_construction": int(ef_construction),
                     "max_neighbors": int(max_neighbors)}
        try:
            self.client = self.backend.connect(self.path)
            self._registry_lock = threading.RLock()
            self._user_locks: dict[str, threading.Lock] = {}
            self._collections: dict[str, object] = {}
            self._counts: dict[str, int] = {}  # embedded store only: see count()
            self._count_versions: dict[str, int] = {}
            self._count_lock = threading.Lock()
            self._queries = GroupBatcher(self._query_group, max_batch=query_batch, name="store-query")  # see query()
            self.registry = self.backend.registry(self.client, self.path, User)
            self._remove_orphans()
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        if hasattr(self, "_queries"):
            self._queries.close()
        self._collections.clear()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- registry

    def _remove_orphans(self) -> None:
        referenced = {u.collection for u in self.registry.all()}
        oldest = time.time() - self.backend.orphan_age_s  # a shared server: others may be filling new ones
        for collection in self.client.list_collections():
            if collection.name.startswith(COLLECTION_PREFIX) and collection.name not in referenced:
                created = float((collection.metadata or {}).get("created_at", 0.0))
                if self.backend.orphan_age_s and created > oldest:
                    continue
                logger.warning("removing collection %s left by an interrupted initialize/re-index", collection.name)
                self.client.delete_collection(collection.name)

    def users(self) -> list[User]:
        return self.registry.all()

    def get_user(self, user_id: str) -> User:
        user = self.registry.get(user_id) if isinstance(user_id, str) else None
        if user is None:
            raise UnknownUserError(user_id)
        return user

    def find_user(self, user_name: str) -> User | None:
        return self.registry.find(user_name)

    def get_or_create_user(self, user_name: str, model_id: str) -> tuple[User, bool]:
        with self._registry_lock:
            user = self.find_user(user_name)
            if user is not None:
                return user, False
            user_id = uuid.uuid4().hex  # 122 random bits: not derivable from the name
            collection = self._create_collection(user_id, model_id, user_name)
            user = User(user_id=user_id, user_name=user_name, collection=collection.name, created_at=time.time())
            registered = self.registry.claim(user)  # atomic across processes on a shared server
            if registered.user_id != user_id:  # another worker created this name a moment ago
                self.abort_rebuild(collection)
                return registered, False
            return user, True

    def user_lock(self, user_id: str) -> threading.Lock:
        """Serialises writes to one user's collection (reads take no lock)."""
        with self._registry_lock:
            return self._user_locks.setdefault(user_id, threading.Lock())

    # ---------------------------------------------------------------- collections

    def _create_collection(self, user_id: str, model_id: str, user_name: str):
        name = f"{COLLECTION_PREFIX}{user_id}_{secrets.token_hex(4)}"
        collection = self.client.create_collection(
            name, configuration={"hnsw": dict(self.hnsw)}, embedding_function=None,
            metadata={"user_id": user_id, "user_name": user_name, "model_id": model_id, "created_at": time.time()},
        )
        self._collections[name] = collection
        return collection

    def collection(self, user: User):
        collection = self._collections.get(user.collection)
        if collection is None:
            collection = self.client.get_collection(user.collection, embedding_function=None)
            hnsw = (collection.configuration or {}).get("hnsw") or {}
            if hnsw.get("ef_search") != self.hnsw["ef_search"]:  # settings changed since it was made
                collection.modify(configuration={"hnsw": {"ef_search": self.hnsw["ef_search"]}})
            self._collections[user.collection] = collection
        return collection

    def model_id(self, user: User) -> str:
        return str((self.collection(user).metadata or {}).get("model_id", ""))

    def set_model_id(self, user: User, model_id: str) -> None:
        collection = self.collection(user)
        metadata = dict(collection.metadata or {})
        metadata["model_id"] = model_id
        collection.modify(metadata=metadata)

    def count(self, user: User) -> int:
        """Records in the user's collection.

        Chroma answers count() with an SQL COUNT over the collection's rows: O(n), ~10 ms at
        100k records, and a search asks twice (docs/benchmarks.md). An embedded store has one
        owner, this process, so the count is kept per collection and dropped by every write to
        it (`_written`); a shared Chroma server is asked every time."""
        collection = self.collection(user)
        if self.backend.shared:
            return collection.count()
        with self._count_lock:
            cached = self._counts.get(collection.name)
            version = self._count_versions.get(collection.name, 0)
        if cached is not None:
            return cached
        value = collection.count()
        with self._count_lock:
            if self._count_versions.get(collection.name, 0) == version:  # no write since it was read
                self._counts[collection.name] = value
        return value

    def _written(self, collection) -> None:
        with self._count_lock:
            self._counts.pop(collection.name, None)
            self._count_versions[collection.name] = self._count_versions.get(collection.name, 0) + 1

    # ---------------------------------------------------------------- records

    def get_records(self, user: User, ids: list[str]) -> dict[str, ImageRecord]:
        found: dict[str, ImageRecord] = {}
        collection = self.collection(user)
        for start in range(0, len(ids), 1000):
            got = collection.get(ids=ids[start:start + 1000], include=["metadatas"])
            for rid, meta in zip(got["ids"], got["metadatas"]):
                found[rid] = ImageRecord.from_metadata(rid, meta)
        return found

    def find_by_hashes(self, user: User, hashes: list[str]) -> dict[str, list[ImageRecord]]:
        """Records whose content hash is in `hashes`, grouped by hash."""
        found: dict[str, list[ImageRecord]] = {}
        unique = sorted(set(hashes))
        collection = self.collection(user)
        for start in range(0, len(unique), 500):
            got = collection.get(where={"sha256": {"$in": unique[start:start + 500]}}, include=["metadatas"])
            for rid, meta in zip(got["ids"], got["metadatas"]):
                record = ImageRecord.from_metadata(rid, meta)
                found.setdefault(record.sha256, []).append(record)
        return found

    def get_embedding(self, user: User, record_id: str) -> np.ndarray | None:
        got = self.collection(user).get(ids=[record_id], include=["embeddings"])
        if not got["ids"]:
            return None
        return np.asarray(got["embeddings"][0], dtype=np.float32)

    def upsert(self, user: User, records: list[ImageRecord], embeddings: np.ndarray, collection=None) -> None:
        """One transaction per call: whole records or none."""
        if not records:
            return
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.shape[0] != len(records):
            raise ValueError("one embedding per record")
        collection = collection if collection is not None else self.collection(user)
        step = self.client.get_max_batch_size()
        try:
            for start in range(0, len(records), step):
                chunk = records[start:start + step]
                collection.upsert(
                    ids=[r.id for r in chunk], embeddings=embeddings[start:start + step],
                    metadatas=[r.metadata() for r in chunk],
                )
        finally:
            self._written(collection)

    def update_metadata(self, user: User, records: list[ImageRecord]) -> None:
        """Refresh metadata (size, mtime) of records whose embedding stays valid."""
        if records:
            self.collection(user).update(ids=[r.id for r in records], metadatas=[r.metadata() for r in records])

    def delete(self, user: User, ids: list[str]) -> None:
        if ids:
            collection = self.collection(user)
            try:
                collection.delete(ids=list(ids))
            finally:
                self._written(collection)

    def query(self, user: User, embedding: np.ndarray, n_results: int, folder: str | None = None
              ) -> list[tuple[ImageRecord, float]]:
        """Nearest records by cosine similarity, best first, with score = 1 - cosine distance.

        In an embedded store, concurrent queries of one collection with the same `n_results` and
        `folder` become ONE Chroma query with all their embeddings, run on one thread
        (`serving.batching.GroupBatcher`): ~15% less CPU per query at 100k records and less
        thread switching under load (docs/benchmarks.md); each caller gets the rows of its own
        embedding, exactly what a query of its own returns. A shared Chroma server is asked
        directly from the caller's thread (its queries run in parallel on the server's cores)."""
        collection = self.collection(user)
        if n_results <= 0:
            return []
        key = (collection.name, int(n_results), folder)
        item = (collection, np.asarray(embedding, dtype=np.float32).reshape(-1))
        if self.backend.shared:
            return self._query_group(key, [item])[0]
        return self._queries.submit(key, item)

    @staticmethod
    def _query_group(key, items: list) -> list[list[tuple[ImageRecord, float]]]:
        _, n_results, folder = key
        where = {"ancestors": {"$contains": folder}} if folder else None
        got = items[0][0].query(
            query_embeddings=np.stack([vector for _, vector in items]), n_results=n_results,
            where=where, include=["metadatas", "distances"],
        )
        return [
            [(ImageRecord.from_metadata(rid, meta), 1.0 - float(dist)) for rid, meta, dist in zip(ids, metas, dists)]
            for ids, metas, dists in zip(got["ids"], got["metadatas"], got["distances"])
        ]

    def list_records(self, user: User, offset: int, limit: int) -> list[ImageRecord]:
        got = self.collection(user).get(offset=offset, limit=limit, include=["metadatas"])
        return [ImageRecord.from_metadata(rid, meta) for rid, meta in zip(got["ids"], got["metadatas"])]

    def records_under(self, user: User, folder: str) -> list[ImageRecord]:
        """Every record whose path is inside `folder` (any depth): what re-adding the folder checks."""
        got = self.collection(user).get(where={"ancestors": {"$contains": str(folder)}}, include=["metadatas"])
        return [ImageRecord.from_metadata(rid, meta) for rid, meta in zip(got["ids"], got["metadatas"])]

    def iter_vectors(self, user: User, batch: int = 1000) -> Iterator[tuple[list[ImageRecord], np.ndarray]]:
        """Every record with its embedding, a page at a time (what a backup writes)."""
        offset = 0
        while True:
            got = self.collection(user).get(offset=offset, limit=batch, include=["metadatas", "embeddings"])
            if not got["ids"]:
                return
            records = [ImageRecord.from_metadata(rid, meta) for rid, meta in zip(got["ids"], got["metadatas"])]
            yield records, np.asarray(got["embeddings"], dtype=np.float32)
            offset += len(records)

    def iter_records(self, user: User, batch: int = 1000) -> Iterator[list[ImageRecord]]:
        offset = 0
        while True:
            records = self.list_records(user, offset, batch)
            if not records:
                return
            yield records
            offset += len(records)

    # ---------------------------------------------------------------- re-index

    def begin_rebuild(self, user: User, model_id: str):
        """A new, empty collection for `user` that `commit_rebuild` will switch to."""
        return self._create_collection(user.user_id, model_id, user.user_name)

    def commit_rebuild(self, user: User, new_collection) -> None:
        """Point the user at the rebuilt collection (one atomic registry write), then drop the old one."""
        with self._registry_lock:
            old = user.collection
            self.registry.save(dataclasses.replace(user, collection=new_collection.name))
            self._collections.pop(old, None)
            self._collections[new_collection.name] = new_collection
        try:
            self.client.delete_collection(old)
        except Exception:  # removed at next open as an orphan
            logger.exception("could not delete the replaced collection %s", old)

    def abort_rebuild(self, new_collection) -> None:
        self._collections.pop(new_collection.name, None)
        try:
            self.client.delete_collection(new_collection.name)
        except Exception:
            logger.exception("could not delete the partial collection %s", new_collection.name)

"""Where the gallery store keeps its vectors and its user registry: embedded, or a Chroma server.

`GalleryStore` (serving/store.py) does the same thing on both; this module is what differs,
chosen by the serve config's `store` group:

- `store=embedded` (the default): `chromadb.PersistentClient` in `<db_path>/chroma` and the users
  in `<db_path>/users.json`. A Chroma process that has loaded an index does not see vectors
  another process adds later, so exactly one process owns the folder (its lock): one machine,
  one gallery worker.
- `store=server store.host=H store.port=P`: `chromadb.HttpClient` against `chroma run`. Every
  read and write goes through that one server process, so any number of gallery workers, on any
  number of machines, see each other's writes at once. The users live in the same server, in
  the collection `smart_gallery_users`: one record per gallery, every field of `User` as
  metadata (fields added to `User` later travel with it). A JSON file on one machine cannot be
  shared that way. The store folder then holds only per-machine files (thumbnail cache,
  uploads, keys) and is not locked.

Creating a gallery must be atomic across processes: the registry record's id is a hash of the
gallery name, and Chroma's `add` of an existing id is ignored, so when two workers create the
same name at once both read back the one record that was stored first and the loser drops its
empty collection.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path

logger = logging.getLogger(__name__)

REGISTRY_VERSION = 1
USERS_COLLECTION = "smart_gallery_users"


class StoreUnavailableError(RuntimeError):
    """The Chroma server cannot be reached (with where it was looked for and what to do)."""


def _chroma_settings():
    from chromadb.config import Settings

    return Settings(anonymized_telemetry=False, allow_reset=False)


def user_from_fields(user_type, values: dict):
    """A `User` from stored fields, ignoring ones this version does not know."""
    known = {f.name for f in fields(user_type)}
    return user_type(**{k: v for k, v in values.items() if k in known})


class EmbeddedBackend:
    """One process owns `<db_path>`: Chroma's persistent client there, users in users.json."""

    shared = False  # several processes may not open it (GalleryStore takes the folder lock)
    orphan_age_s = 0.0  # the owner alone writes: any collection the registry does not name is left over

    def describe(self, folder: Path) -> str:
        return f"embedded Chroma in {folder}"

    def connect(self, folder: Path):
        import chromadb

        return chromadb.PersistentClient(path=str(folder / "chroma"), settings=_chroma_settings())

    def registry(self, client, folder: Path, user_type) -> "JsonRegistry":
        return JsonRegistry(folder / "users.json", user_type)


class ServerBackend:
    """A `chroma run` server shared by every gallery worker; the users in one of its collections."""

    shared = True

    def __init__(self, host: str = "127.0.0.1", port: int = 8001, ssl: bool = False, headers: dict | None = None,
                 users_collection: str = USERS_COLLECTION, connect_timeout_s: float = 30.0,
                 orphan_age_s: float = 86_400.0):
        self.host, self.port, self.ssl = str(host), int(port), bool(ssl)
        self.headers = {str(k): str(v) for k, v in (headers or {}).items()}  # e.g. the server's auth token
        self.users_collection = users_collection
        self.connect_timeout_s = float(connect_timeout_s)
        # Another worker may be filling a collection it has not registered yet (a new gallery, a
        # re-index): only collections older than this, and still unnamed, count as left over.
        self.orphan_age_s = float(orphan_age_s)

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://{self.host}:{self.port}"

    def describe(self, folder: Path) -> str:
        return f"Chroma server {self.url} (local files in {folder})"

    def connect(self, folder: Path):
        """An HttpClient once the server answers (it may still be starting: retried until the timeout)."""
        import chromadb

        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            try:
                client = chromadb.HttpClient(host=self.host, port=self.port, ssl=self.ssl, headers=self.headers,
                                             settings=_chroma_settings())
                client.heartbeat()
                return client
            except Exception as error:  # connection refused, DNS, TLS, auth: say where and what to do
                if time.monotonic() >= deadline:
                    raise StoreUnavailableError(
                        f"no Chroma server answers at {self.url} ({type(error).__name__}: {str(error)[:200]}); "
                        f"start one with `chroma run --path /srv/chroma --host 0.0.0.0 --port {self.port}` or set "
                        "store.host / store.port") from None
                time.sleep(0.5)

    def registry(self, client, folder: Path, user_type) -> "ChromaRegistry":
        return ChromaRegistry(client, self.users_collection, user_type)


class JsonRegistry:
    """The users of an embedded store: held in memory, written atomically to one JSON file."""

    def __init__(self, file: Path, user_type):
        self.file, self.user_type = file, user_type
        self._lock = threading.RLock()
        self._users = {}
        if file.exists():
            data = json.loads(file.read_text())
            self._users = {uid: user_from_fields(user_type, {"user_id": uid, **entry})
                           for uid, entry in data.get("users", {}).items()}

    def all(self) -> list:
        return list(self._users.values())

    def get(self, user_id: str):
        return self._users.get(user_id)

    def find(self, user_name: str):
        return next((u for u in self._users.values() if u.user_name == user_name), None)

    def claim(self, user):
        """Register `user` unless its name is taken; returns the registered user of that name."""
        with self._lock:
            existing = self.find(user.user_name)
            if existing is not None:
                return existing
            self.save(user)
            return user

    def save(self, user) -> None:
        from serving.store import _write_json_atomic

        with self._lock:
            self._users[user.user_id] = user
            data = {"version": REGISTRY_VERSION, "users": {
                u.user_id: {k: v for k, v in asdict(u).items() if k != "user_id"} for u in self._users.values()}}
            _write_json_atomic(self.file, data)


class ChromaRegistry:
    """The users as records of one Chroma collection, read from the server on every lookup.

    No cache: another worker may have created the gallery or switched it to a re-indexed
    collection a moment ago. A lookup is one small request (about 2 ms on loopback).
    """

    def __init__(self, client, name: str, user_type):
        self.user_type = user_type
        # Chroma stores vectors: each record gets a constant one-dimensional placeholder.
        self.collection = client.get_or_create_collection(
            name, embedding_function=None, metadata={"purpose": "Smart Gallery user registry"})

    @staticmethod
    def record_id(user_name: str) -> str:
        return hashlib.sha256(user_name.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def _users(self, got) -> list:
        return [self._decode(meta) for meta in got["metadatas"]]

    def _decode(self, meta: dict):
        values = {k: (json.loads(v[5:]) if isinstance(v, str) and v.startswith("json:") else v)
                  for k, v in meta.items()}
        return user_from_fields(self.user_type, values)

    @staticmethod
    def _encode(user) -> dict:
        """Chroma metadata takes str, int, float, bool (no None, no nesting): others go as JSON text.

        Every field is written, None too ("json:null"): an upsert merges metadata, so a field left
        out would keep its old value."""
        return {key: value if isinstance(value, (str, int, float, bool)) else "json:" + json.dumps(value)
                for key, value in asdict(user).items()}

    def all(self) -> list:
        return self._users(self.collection.get(include=["metadatas"]))

    def get(self, user_id: str):
        users = self._users(self.collection.get(where={"user_id": user_id}, include=["metadatas"]))
        return users[0] if users else None

    def find(self, user_name: str):
        users = self._users(self.collection.get(ids=[self.record_id(user_name)], include=["metadatas"]))
        return users[0] if users else None

    def claim(self, user):
        key = self.record_id(user.user_name)
        self.collection.add(ids=[key], embeddings=[[1.0]], metadatas=[self._encode(user)])  # ignored if taken
        return self.find(user.user_name)

    def save(self, user) -> None:
        self.collection.upsert(ids=[self.record_id(user.user_name)], embeddings=[[1.0]],
                               metadatas=[self._encode(user)])

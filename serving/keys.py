"""Per-gallery API keys: made once, stored only as hashes, checked in the store-owning worker.

Why here and like this
----------------------
A gallery id is no longer a secret (it shows up in URLs and logs); the key is. Each gallery
gets its own key when it is created (`POST /db/initialize` answers it once), so holding one
gallery's key reads that gallery only. The server's `api_key` setting is the *admin* key: it
opens every gallery, creates galleries off loopback, and revokes keys.

Keys are 256-bit random tokens, so a plain SHA-256 is the right hash (a slow password hash
protects low-entropy secrets; these have none to protect). Only the hash is kept, in
`keys.json` in the store folder beside the user registry, written atomically under a file lock
and re-read when it changes (several gallery workers may share it with a Chroma server store). It is a file of
its own, not part of the registry: the registry may move into Chroma (server mode) and keys
must stay on the machine that checks them.

The HTTP process never sees this file: it hashes whatever key a request carries and forwards
only the hash with the operation (`Caller`), so neither the key nor its hash is written to a
log. The worker decides (`authorize`):

- no key checking (loopback server without `auth`): everything is allowed, as before;
- the admin key: everything;
- a gallery's key: that gallery; another gallery's ids answer 404, the same as an unknown id,
  so a key does not confirm which galleries exist;
- no key or an unknown key: 401.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from serving.errors import GalleryError, forbidden, not_found

KEYS_FILE = "keys.json"
KEY_PREFIX = "sgk_"  # recognisable in a config file or a secret scanner


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def unauthorized(detail: str = "missing or unknown API key: send the gallery's key (or the admin key) as "
                               "'X-API-Key: <key>' or 'Authorization: Bearer <key>'") -> GalleryError:
    return GalleryError(401, detail)


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the HTTP process saw it (picklable; never the key itself)."""
    admin: bool = False
    key_hash: str | None = None

    @classmethod
    def from_dict(cls, value: dict | None) -> "Caller":
        value = value or {}
        return cls(admin=bool(value.get("admin")), key_hash=value.get("key_hash"))


class KeyRing:
    """user_id -> hash of that gallery's key, persisted in `<store>/keys.json`."""

    def __init__(self, folder: Path):
        self.file = Path(folder) / KEYS_FILE
        self._lock = threading.Lock()
        self._hashes: dict[str, str] = {}
        self._seen = None  # (mtime_ns, size, inode) of the file last read
        self._refresh()

    def _refresh(self) -> None:
        """Re-read the file when it changed: with a Chroma server store several gallery workers
        share one keys.json, and a key rotated in one must stop working in all of them."""
        try:
            stat = self.file.stat()
        except FileNotFoundError:
            self._hashes, self._seen = {}, None
            return
        seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if seen != self._seen:
            data = json.loads(self.file.read_text())
            self._hashes = {uid: entry["sha256"] for uid, entry in data.get("keys", {}).items()}
            self._seen = seen

    def _change(self, update) -> object:
        """Read, change and write keys.json under an exclusive file lock (threads and processes)."""
        with self._lock, open(self.file.with_name(KEYS_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            self._seen = None
            self._refresh()
            result = update(self._hashes)
            self._save()
            self._seen = None
            return result

    def _save(self) -> None:
        """Atomically (temp file, fsync, rename, fsync the folder): a crash leaves the old or the new file."""
        data = {"version": 1, "updated_at": time.time(),
                "keys": {uid: {"sha256": digest} for uid, digest in sorted(self._hashes.items())}}
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)  # hashes only, but nobody else needs to read them
        os.replace(tmp, self.file)
        folder = os.open(self.file.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def issue(self, user_id: str) -> str:
        """A new key for the gallery (replacing any previous one); returned once, only its hash kept."""
        key = new_key()
        self._change(lambda hashes: hashes.__setitem__(user_id, key_hash(key)))
        return key

    def revoke(self, user_id: str) -> bool:
        return self._change(lambda hashes: hashes.pop(user_id, None) is not None)

    def has_key(self, user_id: str) -> bool:
        with self._lock:
            self._refresh()
            return user_id in self._hashes

    def owner(self, digest: str | None) -> str | None:
        """The user_id whose key has this hash (compared in constant time), or None."""
        if not digest:
            return None
        with self._lock:
            self._refresh()
            hashes = list(self._hashes.items())
        found = None
        for uid, stored in hashes:
            if hmac.compare_digest(stored, digest):
                found = uid
        return found

    def authorize(self, caller: Caller, user_id: str | None, admin_only: bool = False) -> None:
        """Raise 401/403/404 unless `caller` may act on gallery `user_id` (see the module docstring)."""
        if caller.admin:
            return
        owner = self.owner(caller.key_hash)
        if owner is None:
            raise unauthorized()
        if admin_only:
            raise forbidden("this needs the server's admin key (the api_key setting)")
        if user_id is not None and owner != user_id:
            raise not_found("unknown user_id; create a gallery with POST /db/initialize {\"user_name\": ...}")

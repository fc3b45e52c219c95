"""Backup and restore of one gallery: its vectors, records and model id in one file.

Why this format
---------------
One `.npz` file (a zip of arrays; numpy reads it with `allow_pickle=False`, so opening a backup
never runs code): `header` (JSON: format, version, gallery name, model id, dimension, count,
time), `ids`, `embeddings` (float32, one row per record) and `records` (JSON: path, size,
mtime, sha256, added time per id). It carries no key: a restored gallery gets a new one.

Restoring compares the backup's model id with the model the target runs. Vectors of two
models cannot be mixed or compared, so a mismatch is refused unless re-indexing was asked
for: then the stored paths are embedded again from the files (those that are gone are listed),
and the backup's vectors are not used.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from serving.errors import GalleryError, conflict
from serving.store import ImageRecord, image_id

FORMAT = "smart-gallery-backup"
VERSION = 1


def export_gallery(store, user, target: str | Path) -> dict:
    """Write `user`'s gallery to `target` (written beside it first, then renamed: never half a file)."""
    target = Path(target).expanduser().absolute()
    ids, vectors, records = [], [], []
    for page, embeddings in store.iter_vectors(user):
        for record in page:
            ids.append(record.id)
            records.append({"path": record.path, "size": record.size, "mtime_ns": record.mtime_ns,
                            "sha256": record.sha256, "added_at": record.added_at})
        vectors.append(embeddings)
    embeddings = np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
    header = {"format": FORMAT, "version": VERSION, "user_name": user.user_name, "model_id": store.model_id(user),
              "dim": int(embeddings.shape[1]) if embeddings.size else 0, "count": len(ids),
              "exported_at": time.time()}
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial.npz")
    with open(partial, "wb") as handle:
        np.savez(handle, header=np.array(json.dumps(header)), ids=np.array(ids, dtype=str),
                 embeddings=embeddings.astype(np.float32), records=np.array(json.dumps(records)))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, target)
    return {**header, "file": str(target), "bytes": target.stat().st_size}


def read_backup(source: str | Path, max_bytes: int | None = None) -> tuple[dict, list[str], np.ndarray, list[dict]]:
    """(header, ids, embeddings, records) of a backup file; 422 for anything that is not one.

    `max_bytes` bounds what the archive may unpack to (an uploaded file could be a zip bomb)."""
    try:
        if max_bytes is not None:
            with zipfile.ZipFile(Path(source).expanduser()) as archive:
                unpacked = sum(info.file_size for info in archive.infolist())
            if unpacked > max_bytes:
                raise GalleryError(413, f"the backup unpacks to {unpacked} bytes (limit {max_bytes})")
        with np.load(Path(source).expanduser(), allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            ids = [str(i) for i in data["ids"]]
            embeddings = np.asarray(data["embeddings"], dtype=np.float32)
            records = json.loads(str(data["records"]))
    except FileNotFoundError:
        raise GalleryError(404, f"no such backup file: {source}") from None
    except (OSError, ValueError, KeyError, EOFError, MemoryError, zipfile.BadZipFile) as error:
        raise GalleryError(422, f"{source} is not a Smart Gallery backup: {error}") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise GalleryError(422, f"{source} is not a Smart Gallery backup of version {VERSION}")
    if not (len(ids) == len(records) == header.get("count") and (not ids or embeddings.shape[0] == len(ids))):
        raise GalleryError(422, f"{source} is inconsistent (ids, records and vectors differ in number)")
    return header, ids, embeddings, records


def import_gallery(gallery, source: str | Path, name: str | None = None, reindex: bool = False,
                   max_bytes: int | None = None) -> dict:
    """Restore a backup into `gallery` (a `serving.gallery.Gallery`) as gallery `name`
    (default: the backup's name). Records already there with the same id are replaced."""
    from serving.ingest import IngestReport, stat_file

    header, ids, embeddings, rows = read_backup(source, max_bytes)
    name = name or header.get("user_name")
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 128:
        raise GalleryError(422, "the gallery name must be 1-128 characters (give one with --gallery / user_name)")
    try:
        rows = [{"path": str(row["path"]), "size": int(row["size"]), "mtime_ns": int(row["mtime_ns"]),
                 "sha256": str(row["sha256"]), "added_at": float(row["added_at"])} for row in rows]
    except (KeyError, TypeError, ValueError) as error:
        raise GalleryError(422, f"{source} has malformed records: {error!r}") from None
    if any(image_id(row["path"]) != rid for rid, row in zip(ids, rows)):  # ids are the hash of the path
        raise GalleryError(422, f"{source} is inconsistent: a record id does not match its path")
    if header["model_id"] != gallery.model_id and not reindex:
        raise conflict(
            f"the backup holds embeddings of model {header['model_id']} but this store is served with model "
            f"{gallery.model_id}; restore with re-indexing (--reindex: the pictures are embedded again from their "
            "files) or use the checkpoint of that model")
    info = gallery.initialize(name)
    user = gallery.store.get_user(info["user_id"])
    gallery._require_model(user)  # 409 when the target gallery holds another model's vectors
    report = IngestReport()
    imported = 0
    if header["model_id"] == gallery.model_id and not reindex:
        records = [ImageRecord(id=rid, **row) for rid, row in zip(ids, rows)]
        with gallery.store.user_lock(user.user_id):
            for start in range(0, len(records), 1000):
                try:
                    gallery.store.upsert(user, records[start:start + 1000], embeddings[start:start + 1000])
                except Exception as error:  # e.g. vectors of another dimension in a hand-made file
                    raise GalleryError(422, f"the backup's vectors do not fit this gallery: {error}") from None
        imported = len(records)
    else:
        entries = []
        for row in rows:
            path = Path(row["path"])
            if not path.is_file():
                report.failures.append({"path": row["path"], "reason": "the file is gone", "status": 404})
                continue
            try:
                entries.append(stat_file(gallery.policy.resolve(str(path), "path")))
            except GalleryError as error:
                report.fail(row["path"], error)
        gallery.ingestor.ingest(user, entries, report)
        imported = report.added + report.updated + report.unchanged
    return {"gallery": name, "user_id": user.user_id, "created": info["created"], "imported": imported,
            "reindexed": bool(reindex or header["model_id"] != gallery.model_id),
            "backup_model_id": header["model_id"], "model_id": gallery.model_id, "failed": len(report.failures),
            "failed_files": report.failures, "images": gallery.store.count(user)}

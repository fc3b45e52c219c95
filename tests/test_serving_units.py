"""Serving without HTTP: path policy, settings, the store, and the gallery service on real
ChromaDB with a tiny checkpoint and real image files."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serving.config import ConfigError, ServeSettings
from serving.errors import GalleryError
from serving.gallery import Gallery
from serving.ingest import FileEntry, decode_file
from serving.paths import PathPolicy, ancestors
from serving.store import GalleryStore, ImageRecord, StoreLockedError, image_id
from tests.serving_fixtures import tiny_checkpoint, write_image, write_truncated_jpeg

FORMATS = [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tiff", ".JPG"]


def open_gallery(db: Path, seed: int = 1, roots=(), **ingest) -> Gallery:
    checkpoint, _ = tiny_checkpoint(seed)
    settings = ServeSettings.from_mapping({
        "checkpoint": str(checkpoint), "db_path": str(db), "allowed_roots": [str(r) for r in roots],
        "ingest": {"batch_size": 4, **ingest},
    })
    return Gallery.open(settings)


def count_status(error: pytest.ExceptionInfo) -> int:
    return error.value.status_code


# ------------------------------------------------------------------ path policy and settings


def test_path_policy_resolves_before_checking(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_image(root / "in.jpg", 1)
    write_image(outside / "secret.jpg", 2)
    (root / "link.jpg").symlink_to(outside / "secret.jpg")
    (root / "linkdir").symlink_to(outside)
    policy = PathPolicy([str(root)])

    assert policy.resolve(str(root / "in.jpg")) == (root / "in.jpg").resolve()
    for escaping in (root / ".." / "outside" / "secret.jpg", root / "link.jpg", root / "linkdir" / "secret.jpg",
                     outside / "missing.jpg", Path("/etc/hostname")):
        with pytest.raises(GalleryError) as error:
            policy.resolve(str(escaping))
        assert count_status(error) == 403, escaping
    for malformed in ("relative/x.jpg", "", "/a\x00b"):
        with pytest.raises(GalleryError) as error:
            policy.resolve(malformed)
        assert count_status(error) == 400
    assert PathPolicy([]).resolve(str(outside / "secret.jpg")) == (outside / "secret.jpg").resolve()
    assert ancestors("/a/b/c.jpg") == ["/", "/a", "/a/b"]


def test_settings_refuse_public_bind_without_roots_and_key(tmp_path):
    base = {"checkpoint": "x"}
    ServeSettings.from_mapping(base).validate()  # loopback, no roots, no key: the original behaviour
    with pytest.raises(ConfigError, match="allowed_roots.*API key"):
        ServeSettings.from_mapping({**base, "host": "0.0.0.0"}).validate()
    with pytest.raises(ConfigError, match="API key"):
        ServeSettings.from_mapping({**base, "host": "0.0.0.0", "allowed_roots": [str(tmp_path)]}).validate()
    ServeSettings.from_mapping({**base, "host": "0.0.0.0", "allowed_roots": [str(tmp_path)],
                                "api_key": "k" * 32}).validate()
    with pytest.raises(ConfigError, match="at least 16"):
        ServeSettings.from_mapping({**base, "api_key": "short"}).validate()
    with pytest.raises(ConfigError, match="can bind only"):
        ServeSettings.from_mapping({**base, "host": "10.1.2.3"}).validate()
    with pytest.raises(ConfigError, match="not an existing folder"):
        ServeSettings.from_mapping({**base, "allowed_roots": [str(tmp_path / "nope")]}).validate()
    with pytest.raises(ConfigError, match="unknown serve settings"):
        ServeSettings.from_mapping({**base, "prot": 1})


def test_search_settings_compose_from_serve_yaml_and_reach_the_batchers(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    checkpoint, _ = tiny_checkpoint(1)
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base=None):
        default = compose(config_name="serve", overrides=[f"checkpoint={checkpoint}"])
        tuned = compose(config_name="serve", overrides=[f"checkpoint={checkpoint}", f"db_path={tmp_path / 'db'}",
                                                        "search.request_threads=5", "search.max_batch=3",
                                                        "search.text_threads=1"])
    assert ServeSettings.from_mapping(OmegaConf.to_container(default, resolve=True)).search.max_batch == 8
    settings = ServeSettings.from_mapping(OmegaConf.to_container(tuned, resolve=True))
    settings.validate()
    assert settings.search.request_threads == 5
    gallery = Gallery.open(settings)
    try:
        assert gallery.store._queries._max_batch == 3
        assert gallery.embedder._batcher._batcher._max_batch == 3
        assert gallery.embedder.backend == "onnxruntime"
        assert gallery.embedder.encoders.text_session.get_session_options().intra_op_num_threads == 1
    finally:
        gallery.close()
    for bad in ({"request_threads": 0}, {"max_batch": 0}, {"text_threads": 0}):
        with pytest.raises(ConfigError, match="search"):
            ServeSettings.from_mapping({"checkpoint": str(checkpoint), "search": bad}).validate()


# ------------------------------------------------------------------ store


def test_store_lock_registry_orphans_and_scores(tmp_path):
    db = tmp_path / "db"
    with GalleryStore(db) as store:
        with pytest.raises(StoreLockedError, match="in use"):
            GalleryStore(db)
        user, created = store.get_or_create_user("alice", "model-a")
        assert created and len(user.user_id) == 32
        again, created = store.get_or_create_user("alice", "model-a")
        assert not created and again.user_id == user.user_id
        config = store.collection(user).configuration["hnsw"]
        assert config["space"] == "cosine" and config["ef_search"] == 300
        vectors = np.eye(3, 8, dtype=np.float32)
        vectors[2] = (vectors[0] + vectors[1]) / np.sqrt(2)
        records = [ImageRecord(image_id(f"/p/{i}.jpg"), f"/p/{i}.jpg", 1, 2, f"h{i}", 0.0) for i in range(3)]
        store.upsert(user, records, vectors)
        hits = store.query(user, vectors[0], 3)
        assert [r.path for r, _ in hits] == ["/p/0.jpg", "/p/2.jpg", "/p/1.jpg"]
        assert [round(s, 4) for _, s in hits] == [1.0, round(1 / np.sqrt(2), 4), 0.0]
        store.client.create_collection("gallery_leftover_0000", embedding_function=None)  # as a crash would leave
    with GalleryStore(db, ef_search=200) as store:
        assert store.find_user("alice").user_id == user.user_id
        assert store.collection(store.get_user(user.user_id)).configuration["hnsw"]["ef_search"] == 200
        assert store.count(store.get_user(user.user_id)) == 3
        assert [c.name for c in store.client.list_collections()] == [user.collection]


# ------------------------------------------------------------------ gallery service


@pytest.fixture
def pictures(tmp_path) -> Path:
    root = tmp_path / "pictures"
    for index, ext in enumerate(FORMATS):
        write_image(root / ("sub/deeper" if index % 3 == 0 else "sub" if index % 3 == 1 else ".") / f"img{index}{ext}", index)
    (root / "notes.txt").write_text("not a picture")
    return root


def test_ingest_dedup_update_move_and_failures(tmp_path, pictures):
    gallery = open_gallery(tmp_path / "db", roots=[tmp_path])
    try:
        uid = gallery.initialize("me")["user_id"]
        first = gallery.add_folder(uid, str(pictures))
        assert (first["added"], first["failed"], first["duplicates"], first["ignored"]) == (len(FORMATS), 0, 0, 1)
        again = gallery.add_folder(uid, str(pictures))
        assert (again["added"], again["unchanged"], again["updated"]) == (0, len(FORMATS), 0)

        target = pictures / "img1.jpeg" if (pictures / "img1.jpeg").exists() else next(pictures.rglob("img1.*"))
        os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same content
        assert gallery.add_image(uid, str(target))["status"] == "unchanged"
        write_image(target, 100, fmt="JPEG")  # new content at the same path
        changed = gallery.add_folder(uid, str(pictures))
        assert (changed["updated"], changed["unchanged"]) == (1, len(FORMATS) - 1)

        copy = pictures / "copies" / "copy.png"
        copy.parent.mkdir()
        original = next(pictures.rglob("img2.*"))
        shutil.copy(original, copy)
        dup = gallery.add_folder(uid, str(pictures))
        assert dup["duplicates"] == 1 and dup["duplicate_files"][0]["path"] == str(copy.resolve())
        assert dup["duplicate_files"][0]["duplicate_of"] == str(original.resolve())
        single = gallery.add_image(uid, str(copy))
        assert single["status"] == "duplicate" and single["duplicate_of"]["path"] == str(original.resolve())
        assert gallery.info(uid)["images"] == len(FORMATS)  # never stored twice

        moved = pictures / "moved" / original.name
        moved.parent.mkdir()
        original.rename(moved)
        copy.unlink()
        after_move = gallery.add_folder(uid, str(pictures))
        assert after_move["added"] == 1 and after_move["duplicates"] == 0
        paths = {img["path"] for img in gallery.list_images(uid, 0, 100)["images"]}
        assert str(moved.resolve()) in paths and str(original.resolve()) not in paths
        assert len(paths) == len(FORMATS)

        write_truncated_jpeg(pictures / "broken.jpg")
        (pictures / "fake.png").write_text("text with an image extension")
        write_image(pictures / "new.jpg", 500)
        shutil.copy(pictures / "new.jpg", os.fsencode(pictures) + b"/latin1-\xe9t\xe9.jpg")  # not UTF-8
        mixed = gallery.add_folder(uid, str(pictures))
        reasons = {Path(f["path"]).name: f for f in mixed["failed_files"]}
        assert mixed["added"] == 1 and len(reasons) == 3
        assert reasons["broken.jpg"]["status"] == 422 and reasons["fake.png"]["status"] == 415
        assert [f["status"] for name, f in reasons.items() if name.startswith("latin1")] == [400]
    finally:
        gallery.close()


def test_decoding_applies_exif_orientation(tmp_path):
    path = write_image(tmp_path / "rotated.jpg", 3, size=(64, 48), exif_orientation=6)
    stat = path.stat()
    decoded = decode_file(FileEntry(str(path), stat.st_size, stat.st_mtime_ns), lambda image: image.size, 64, 10**8)
    assert decoded.error is None and decoded.pixels == (48, 64)
    assert len(decoded.sha256) == 64


def test_search_paging_min_score_and_folder_filter(tmp_path, pictures):
    gallery = open_gallery(tmp_path / "db")
    try:
        uid = gallery.initialize("me")["user_id"]
        assert gallery.search(uid, "anything")["results"] == []  # empty gallery
        gallery.add_folder(uid, str(pictures))
        full = gallery.search(uid, "a red square", top_k=len(FORMATS))["results"]
        assert [r["rank"] for r in full] == list(range(1, len(FORMATS) + 1))
        scores = [r["score"] for r in full]
        assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
        page = gallery.search(uid, "a red square", top_k=3, offset=3)["results"]
        assert [r["id"] for r in page] == [r["id"] for r in full[3:6]] and page[0]["rank"] == 4
        threshold = full[2]["score"]
        assert [r["id"] for r in gallery.search(uid, "a red square", min_score=threshold)["results"]] == \
            [r["id"] for r in full if r["score"] >= threshold]
        sub = gallery.search(uid, "a red square", folder=str(pictures / "sub"))["results"]
        expected = {str(p.resolve()) for p in (pictures / "sub").rglob("img*")}
        assert {r["path"] for r in sub} == expected
        with pytest.raises(GalleryError) as error:
            gallery.search(uid, "x", top_k=101)
        assert count_status(error) == 422
    finally:
        gallery.close()


def test_concurrent_adds_never_store_an_image_twice(tmp_path, pictures):
    other = tmp_path / "other"
    shutil.copytree(pictures, other)  # same contents, other paths
    gallery = open_gallery(tmp_path / "db")
    try:
        uid = gallery.initialize("me")["user_id"]
        results = []
        threads = [threading.Thread(target=lambda f=f: results.append(gallery.add_folder(uid, str(f))))
                   for f in (pictures, other, pictures, other)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert gallery.info(uid)["images"] == len(FORMATS)
        assert sum(r["added"] for r in results) == len(FORMATS)
        hashes = [img["sha256"] for img in gallery.list_images(uid, 0, 1000)["images"]]
        assert len(hashes) == len(set(hashes))
    finally:
        gallery.close()


def test_failure_mid_ingest_keeps_whole_batches(tmp_path, pictures, monkeypatch):
    gallery = open_gallery(tmp_path / "db")  # batch_size 4
    try:
        uid = gallery.initialize("me")["user_id"]
        real = gallery.embedder.embed_images
        calls = {"n": 0}

        def failing(pixels):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated crash in the middle of an add-folder")
            return real(pixels)

        monkeypatch.setattr(gallery.embedder, "embed_images", failing)
        with pytest.raises(RuntimeError):
            gallery.add_folder(uid, str(pictures))
        stored = gallery.list_images(uid, 0, 100)["images"]
        assert len(stored) == 4  # exactly the first batch
        user = gallery.store.get_user(uid)
        got = gallery.store.collection(user).get(include=["metadatas", "embeddings"])
        assert all(m["sha256"] and m["path"] and m["size"] > 0 for m in got["metadatas"])
        assert np.allclose(np.linalg.norm(got["embeddings"], axis=1), 1.0, atol=1e-3)
        monkeypatch.setattr(gallery.embedder, "embed_images", real)
        resumed = gallery.add_folder(uid, str(pictures))
        assert (resumed["added"], resumed["unchanged"]) == (len(FORMATS) - 4, 4)
    finally:
        gallery.close()


def test_model_change_conflicts_until_reindexed(tmp_path, pictures):
    db = tmp_path / "db"
    gallery = open_gallery(db, seed=1)
    model_a = gallery.model_id
    uid = gallery.initialize("me")["user_id"]
    empty_uid = gallery.initialize("empty")["user_id"]
    gallery.add_folder(uid, str(pictures))
    gallery.close()
    gone = next(pictures.rglob("img5.*"))
    gone.unlink()

    gallery = open_gallery(db, seed=2)
    try:
        assert gallery.model_id != model_a
        info = gallery.info(uid)
        assert info["needs_reindex"] and info["model_id"] == model_a
        for call in (lambda: gallery.search(uid, "x"), lambda: gallery.add_folder(uid, str(pictures))):
            with pytest.raises(GalleryError) as error:
                call()
            assert count_status(error) == 409 and "re-index" in error.value.detail.lower()
        assert gallery.list_images(uid, 0, 10)["total"] == len(FORMATS)  # still listable
        assert gallery.search(empty_uid, "x")["results"] == []  # an empty gallery adopts the model

        calls = {"n": 0}
        real = gallery.embedder.embed_images

        def failing(pixels):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated crash mid re-index")
            return real(pixels)

        gallery.embedder.embed_images = failing
        with pytest.raises(RuntimeError):
            gallery.reindex(uid)
        gallery.embedder.embed_images = real
        assert gallery.info(uid)["model_id"] == model_a  # untouched by the failed re-index
        assert len(gallery.store.client.list_collections()) == 2  # the partial collection is gone

        result = gallery.reindex(uid)
        assert result["previous_model_id"] == model_a and result["model_id"] == gallery.model_id
        assert result["reindexed"] == len(FORMATS) - 1 and result["failed_files"][0]["path"] == str(gone.resolve())
        assert gallery.store.model_id(gallery.store.get_user(uid)) == gallery.model_id
        assert len(gallery.search(uid, "x", top_k=100)["results"]) == len(FORMATS) - 1
        assert gallery.reindex(uid)["skipped"]
    finally:
        gallery.close()


def test_store_folder_is_not_a_picture_folder(tmp_path):
    """The store (thumbnails, every gallery's uploads) may sit under an allowed root: folder walks
    skip it, and a request may name only the caller's own uploads inside it."""
    root = tmp_path / "home"
    for index in range(3):
        write_image(root / "photos" / f"h{index}.jpg", 50 + index)
    gallery = open_gallery(root / "gallery_db", roots=[root])
    try:
        alice = gallery.initialize("alice")["user_id"]
        bob = gallery.initialize("bob")["user_id"]
        own = write_image(tmp_path / "own.png", 77)
        uploaded = gallery.upload(alice, own.read_bytes(), "own.png")
        assert uploaded["status"] == "added" and uploaded["path"].startswith(str(gallery.uploads_dir / alice))
        gallery.thumbnail(alice, uploaded["id"])  # makes a JPEG under gallery_db/thumbnails
        assert gallery.add_image(alice, uploaded["path"])["status"] == "unchanged"  # own upload: allowed
        with pytest.raises(GalleryError) as error:
            gallery.add_image(bob, uploaded["path"])
        assert error.value.status_code == 403
        with pytest.raises(GalleryError) as error:
            gallery.search_by_image(bob, image_path=uploaded["path"])
        assert error.value.status_code == 403
        with pytest.raises(GalleryError) as error:
            gallery.add_folder(bob, str(root / "gallery_db"))
        assert error.value.status_code == 403
        report = gallery.add_folder(bob, str(root))
        assert (report["added"], report["failed"]) == (3, 0)  # the photos only: no thumbnails, no uploads
        listed = gallery.list_images(bob)["images"]
        assert all(img["path"].startswith(str(root / "photos")) for img in listed)
    finally:
        gallery.close()


def test_malloc_settings_keep_what_the_user_set_and_trim_runs(monkeypatch):
    from serving.memory import MALLOC_DEFAULTS, release_free_memory, tune_malloc

    for name in MALLOC_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    tune_malloc()
    assert os.environ["MALLOC_ARENA_MAX"] == "4"  # the user's value
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(1 << 20)
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == str(4 << 20)
    freed = [bytearray(1 << 16) for _ in range(200)]  # heap blocks (below the mmap threshold)
    del freed
    release_free_memory()  # glibc: returns free pages; elsewhere a no-op, never an error

"""Galleries that stay true to the disk, and backups (issue 9): `serving.cli` prune, export and
import on real stores and files (called in-process through `serving.cli.main`, which is what the
`smart-gallery` script runs), and re-adding a folder over HTTP removing what left it."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from serving.cli import main
from tests.serving_fixtures import ServerProcess, tiny_checkpoint, write_image


def run(capsys, *argv) -> tuple[int, dict | str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    try:
        return code, json.loads(out), err
    except ValueError:
        return code, out, err


def test_prune_then_backup_and_restore(tmp_path, capsys):
    ckpt1, ckpt2 = str(tiny_checkpoint(1)[0]), str(tiny_checkpoint(2)[0])
    album = tmp_path / "album"
    for index in range(5):
        write_image(album / f"b{index}.jpg", 300 + index)
    db, other, third = str(tmp_path / "db"), str(tmp_path / "db2"), str(tmp_path / "db3")
    code, indexed, _ = run(capsys, "index", str(album), "--gallery", "trip", "--db-path", db, "--checkpoint", ckpt1,
                           "--quiet", "--json")
    assert code == 0 and indexed["added"] == 5
    (album / "b0.jpg").unlink()  # gone
    write_image(album / "b1.jpg", 999)  # changed in place
    os.utime(album / "b1.jpg", ns=(1, 1))

    code, report, _ = run(capsys, "prune", "--gallery", "trip", "--db-path", db, "--dry-run", "--json")
    assert code == 0 and report["checked"] == 5 and report["removed"] == 0 and report["changed"] == 1
    assert {(os.path.basename(f["path"]), f["reason"]) for f in report["files"]} == {("b0.jpg", "missing"),
                                                                                     ("b1.jpg", "changed")}
    code, report, _ = run(capsys, "prune", "--gallery", "trip", "--db-path", db, "--json")
    assert code == 0 and report["removed"] == 1
    code, report, _ = run(capsys, "prune", "--gallery", "trip", "--db-path", db, "--json")
    assert report["checked"] == 4 and report["removed"] == 0  # nothing left to remove

    backup = tmp_path / "trip.npz"
    code, exported, _ = run(capsys, "export", "--gallery", "trip", "--db-path", db, str(backup), "--json")
    assert code == 0 and exported["count"] == 4 and backup.is_file()
    with np.load(backup, allow_pickle=False) as data:  # readable without pickle
        assert data["embeddings"].shape[0] == 4 and json.loads(str(data["header"]))["model_id"] == exported["model_id"]

    code, restored, _ = run(capsys, "import", str(backup), "--db-path", other, "--checkpoint", ckpt1, "--json")
    assert code == 0 and restored["imported"] == 4 and not restored["reindexed"] and restored["api_key"]
    code, found, _ = run(capsys, "search", "anything", "--gallery", "trip", "--db-path", other, "--checkpoint", ckpt1,
                         "--json", "--top-k", "10")
    assert sorted(os.path.basename(r["path"]) for r in found["results"]) == ["b1.jpg", "b2.jpg", "b3.jpg", "b4.jpg"]

    code, out, err = run(capsys, "import", str(backup), "--db-path", third, "--checkpoint", ckpt2)
    assert code == 1 and "--reindex" in err and "model" in err  # another model's vectors: refused
    run(capsys, "galleries", "--db-path", third)
    code, listed, _ = run(capsys, "galleries", "--db-path", third)
    assert listed == ""  # and nothing was created
    code, restored, _ = run(capsys, "import", str(backup), "--db-path", third, "--checkpoint", ckpt2, "--reindex",
                            "--gallery", "trip-again", "--json")
    assert code == 0 and restored["reindexed"] and restored["imported"] == 4 and restored["images"] == 4
    assert restored["model_id"] == tiny_checkpoint(2)[1]

    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not a backup")
    code, out, err = run(capsys, "import", str(tmp_path / "junk.npz"), "--db-path", third, "--checkpoint", ckpt2)
    assert code == 1 and "not a Smart Gallery backup" in err


def test_readding_a_folder_removes_what_left_it_and_search_skips_gone_files(tmp_path):
    album = tmp_path / "album"
    for index in range(4):
        write_image(album / f"r{index}.jpg", 400 + index)
    server = ServerProcess(tiny_checkpoint(1)[0], tmp_path / "db", tmp_path).wait_ready()
    try:
        with server.client() as client:
            uid = client.post("/db/initialize", json={"user_name": "disk"}).json()["user_id"]
            first = client.post("/images/add-folder", params={"user_id": uid}, json={"folder_path": str(album)}).json()
            assert first["added"] == 4 and first["removed"] == 0
            (album / "r0.jpg").unlink()
            search = client.post("/images/search", params={"user_id": uid}, json={"query": "x", "top_k": 10}).json()
            assert search["missing_skipped"] == 1 and len(search["results"]) == 3  # never names a gone file
            assert all(os.path.exists(r["path"]) for r in search["results"])
            (album / "r1.jpg").rename(tmp_path / "moved-out.jpg")
            again = client.post("/images/add-folder", params={"user_id": uid}, json={"folder_path": str(album)}).json()
            assert again["removed"] == 2 and again["unchanged"] == 2
            assert {os.path.basename(f["path"]) for f in again["removed_files"]} == {"r0.jpg", "r1.jpg"}
            assert client.get("/db/info", params={"user_id": uid}).json()["images"] == 2
            (album / "r2.jpg").unlink()
            pruned = client.post("/db/prune", params={"user_id": uid}).json()
            assert pruned["removed"] == 1 and pruned["checked"] == 2
            assert client.get("/images", params={"user_id": uid}).json()["total"] == 1
    finally:
        server.stop()


def test_backup_over_http_between_two_servers(tmp_path):
    """GET /db/export on one server, POST /db/import on another (keys required on both)."""
    album = tmp_path / "album"
    for index in range(3):
        write_image(album / f"h{index}.jpg", 600 + index)
    admin = {"X-API-Key": "backup-admin-key-0123456789"}
    first = ServerProcess(tiny_checkpoint(1)[0], tmp_path / "db1", tmp_path, f"api_key={admin['X-API-Key']}")
    second = ServerProcess(tiny_checkpoint(1)[0], tmp_path / "db2", tmp_path, "auth=true")
    third = ServerProcess(tiny_checkpoint(2)[0], tmp_path / "db3", tmp_path)
    try:
        for server in (first, second, third):
            server.wait_ready()
        with first.client() as client:
            made = client.post("/db/initialize", json={"user_name": "http-trip"}).json()
            key = {"X-API-Key": made["api_key"]}
            client.post("/images/add-folder", params={"user_id": made["user_id"]}, json={"folder_path": str(album)},
                        headers=key)
            assert client.get("/db/export", params={"user_id": made["user_id"]}).status_code == 401
            exported = client.get("/db/export", params={"user_id": made["user_id"]}, headers=key)
            assert exported.status_code == 200 and exported.headers["content-type"] == "application/octet-stream"
            backup = exported.content
            deadline = time.monotonic() + 5  # the temporary file is deleted once the answer is sent
            while list((tmp_path / "db1" / "tmp").glob("export-*")) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not list((tmp_path / "db1" / "tmp").glob("export-*"))
        files = {"file": ("http-trip.npz", backup, "application/octet-stream")}
        with second.client() as client:
            restored = client.post("/db/import", files=files)
            assert restored.status_code == 200, restored.text
            body = restored.json()
            assert (body["gallery"], body["imported"], body["images"], body["reindexed"]) == ("http-trip", 3, 3, False)
            key = {"X-API-Key": body["api_key"]}
            assert client.post("/db/import", files=files).status_code == 409  # exists: needs its key
            found = client.post("/images/search", params={"user_id": body["user_id"]}, json={"query": "x"},
                                headers=key).json()
            assert sorted(os.path.basename(r["path"]) for r in found["results"]) == ["h0.jpg", "h1.jpg", "h2.jpg"]
            junk = client.post("/db/import", files={"file": ("x.npz", b"PK\x03\x04junk", "application/zip")})
            assert junk.status_code == 422
        with third.client() as client:  # another model: refused unless reindex
            refused = client.post("/db/import", files=files)
            assert refused.status_code == 409 and "reindex" in refused.json()["detail"]
            assert client.post("/db/initialize", json={"user_name": "http-trip"}).json()["created"]  # none made
            again = client.post("/db/import", params={"reindex": "true", "user_name": "re"}, files=files).json()
            assert again["reindexed"] and again["imported"] == 3 and again["model_id"] == tiny_checkpoint(2)[1]
    finally:
        for server in (first, second, third):
            server.stop()

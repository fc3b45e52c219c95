"""The HTTP API in-process (LitServe's `wrap_litserve_start` + FastAPI's TestClient), with a
real gallery worker process, real ChromaDB and real files; this server has allowed roots and
an API key, so every safety rule is exercised here."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
from fastapi.testclient import TestClient
from litserve.utils import wrap_litserve_start

from serving.api import build_server
from serving.config import ServeSettings
from tests.serving_fixtures import tiny_checkpoint, write_bomb_png, write_image, write_truncated_jpeg

API_KEY = "test-key-0123456789abcdef"
AUTH = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("http")
    root, outside = base / "root", base / "outside"
    for index in range(6):
        write_image(root / "album" / f"a{index}.jpg", index)
    for index in range(3):
        write_image(root / "album" / "nested" / f"n{index}.png", 100 + index)
    write_image(outside / "secret.jpg", 999)
    (root / "escape.jpg").symlink_to(outside / "secret.jpg")
    (root / "folder.jpg").mkdir()
    (root / "notes.txt").write_text("hello")
    (root / "fake.jpg").write_text("not a jpeg")
    write_truncated_jpeg(root / "truncated.jpg")
    write_bomb_png(root / "bomb.png")
    checkpoint, model_id = tiny_checkpoint(1)
    settings = ServeSettings.from_mapping({
        "checkpoint": str(checkpoint), "db_path": str(base / "db"), "allowed_roots": [str(root)],
        "api_key": API_KEY, "max_body_bytes": 4096, "log_level": "warning",
    })
    settings.validate()
    server = build_server(settings)
    with wrap_litserve_start(server) as server, TestClient(server.app) as client:
        deadline = time.monotonic() + 90
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "worker did not become ready"
            time.sleep(0.2)
        yield {"client": client, "root": root, "outside": outside, "model_id": model_id, "db": base / "db"}


def post(client, path, body, headers=AUTH, **params):
    return client.post(path, params=params, json=body, headers=headers)


def new_user(client, name) -> str:
    response = post(client, "/db/initialize", {"user_name": name})
    assert response.status_code == 200, response.text
    return response.json()["user_id"]


def snapshot(client, uid):
    listing = client.get("/images", params={"user_id": uid, "limit": 1000}, headers=AUTH).json()
    return listing["total"], sorted((img["id"], img["path"], img["sha256"]) for img in listing["images"])


def test_health_docs_and_openapi(env):
    client = env["client"]
    assert client.get("/health").status_code == 200  # no key needed for the health probe
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path, method in [("/db/initialize", "post"), ("/db/reindex", "post"), ("/db/info", "get"),
                         ("/images/add", "post"), ("/images/add-folder", "post"), ("/images/search", "post"),
                         ("/images", "get"), ("/images/{image_id}", "delete")]:
        assert method in spec["paths"][path], path
    schemas = spec["components"]["schemas"]
    for name in ("InitializeRequest", "AddImageRequest", "AddFolderRequest", "SearchRequest", "SearchResponse",
                 "AddFolderResponse", "AddImageResponse", "ListImagesResponse", "ReindexResponse"):
        assert name in schemas, name
    assert schemas["SearchRequest"]["properties"]["top_k"]["maximum"] == 100
    search = spec["paths"]["/images/search"]["post"]
    assert search["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("SearchResponse")


def test_api_key_is_required(env):
    client = env["client"]
    body = {"user_name": "keyed"}
    created = post(client, "/db/initialize", body, headers={})  # loopback: anyone may create a gallery
    assert created.status_code == 200 and created.json()["created"], created.text
    key, uid = created.json()["api_key"], created.json()["user_id"]
    assert key.startswith("sgk_") and len(key) > 40
    assert post(client, "/db/initialize", body, headers={}).status_code == 409  # opening it needs its key
    wrong = post(client, "/db/initialize", body, headers={"X-API-Key": "wrong-key-wrong-key"})
    assert wrong.status_code == 401 and "API key" in wrong.json()["detail"]
    assert post(client, "/db/initialize", body, headers={"Authorization": "Bearer nope"}).status_code == 401
    for headers in ({"X-API-Key": key}, AUTH, {"Authorization": f"Bearer {API_KEY}"}, {"Authorization": f"Bearer {key}"}):
        again = post(client, "/db/initialize", body, headers=headers)
        assert again.status_code == 200 and again.json()["user_id"] == uid and again.json()["api_key"] is None
    assert client.get("/db/info", params={"user_id": uid}).status_code == 401


def test_gallery_keys_open_their_own_gallery_only(env):
    client, root = env["client"], env["root"]
    mine = post(client, "/db/initialize", {"user_name": "key-mine"}, headers={}).json()
    theirs = post(client, "/db/initialize", {"user_name": "key-theirs"}, headers={}).json()
    me, them = {"X-API-Key": mine["api_key"]}, {"X-API-Key": theirs["api_key"]}
    added = post(client, "/images/add", {"image_path": str(root / "album" / "a5.jpg")}, headers=me,
                 user_id=mine["user_id"])
    assert added.status_code == 200, added.text
    image = added.json()["id"]
    assert client.get("/db/info", params={"user_id": mine["user_id"]}, headers=me).status_code == 200
    for path in ("/db/info", "/images", f"/images/{image}", f"/images/{image}/file"):  # another key: 404, as unknown
        response = client.get(path, params={"user_id": mine["user_id"]}, headers=them)
        assert response.status_code == 404, (path, response.text)
    assert post(client, "/images/search", {"query": "x"}, headers=them, user_id=mine["user_id"]).status_code == 404
    assert client.get("/db/info", params={"user_id": mine["user_id"]}, headers=AUTH).status_code == 200  # admin

    rotated = client.post("/db/keys/rotate", params={"user_id": mine["user_id"]}, headers=me)
    assert rotated.status_code == 200 and rotated.json()["api_key"] != mine["api_key"]
    fresh = {"X-API-Key": rotated.json()["api_key"]}
    assert client.get("/db/info", params={"user_id": mine["user_id"]}, headers=me).status_code == 401  # old key dead
    assert client.get("/db/info", params={"user_id": mine["user_id"]}, headers=fresh).status_code == 200
    assert client.post("/db/keys/revoke", params={"user_id": mine["user_id"]}, headers=fresh).status_code == 403
    revoked = client.post("/db/keys/revoke", params={"user_id": mine["user_id"]}, headers=AUTH)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert client.get("/db/info", params={"user_id": mine["user_id"]}, headers=fresh).status_code == 401
    assert client.get("/images", params={"user_id": mine["user_id"]}, headers=AUTH).json()["total"] == 1

    stored = (env["db"] / "keys.json").read_text()  # only hashes are kept
    for key in (mine["api_key"], theirs["api_key"], rotated.json()["api_key"]):
        assert key not in stored
    assert hashlib.sha256(theirs["api_key"].encode()).hexdigest() in stored


def test_add_search_list_delete(env):
    client, root = env["client"], env["root"]
    uid = new_user(client, "main")
    empty = post(client, "/images/search", {"query": "a cat"}, user_id=uid)
    assert empty.status_code == 200 and empty.json()["results"] == []

    single = post(client, "/images/add", {"image_path": str(root / "album" / "a0.jpg")}, user_id=uid)
    assert single.status_code == 200 and single.json()["status"] == "added", single.text
    found = post(client, "/images/search", {"query": "anything", "top_k": 5}, user_id=uid).json()
    assert [r["path"] for r in found["results"]] == [str(root / "album" / "a0.jpg")]

    folder = post(client, "/images/add-folder", {"folder_path": str(root / "album")}, user_id=uid).json()
    assert (folder["added"], folder["unchanged"], folder["failed"]) == (8, 1, 0)
    result = post(client, "/images/search", {"query": "a blue sky", "top_k": 4, "offset": 2}, user_id=uid).json()
    assert [r["rank"] for r in result["results"]] == [3, 4, 5, 6] and result["total_images"] == 9
    nested = post(client, "/images/search", {"query": "x", "folder": str(root / "album" / "nested")}, user_id=uid)
    assert {os.path.basename(r["path"]) for r in nested.json()["results"]} == {"n0.png", "n1.png", "n2.png"}

    page = client.get("/images", params={"user_id": uid, "offset": 5, "limit": 3}, headers=AUTH).json()
    assert page["total"] == 9 and len(page["images"]) == 3
    victim = page["images"][0]
    deleted = client.delete(f"/images/{victim['id']}", params={"user_id": uid}, headers=AUTH)
    assert deleted.status_code == 200 and deleted.json()["deleted"]["path"] == victim["path"]
    assert client.delete(f"/images/{victim['id']}", params={"user_id": uid}, headers=AUTH).status_code == 404
    after = post(client, "/images/search", {"query": "x", "top_k": 100}, user_id=uid).json()
    assert victim["id"] not in {r["id"] for r in after["results"]} and after["total_images"] == 8
    info = client.get("/db/info", params={"user_id": uid}, headers=AUTH).json()
    assert info["model_id"] == env["model_id"] and info["images"] == 8 and not info["needs_reindex"]


def test_users_are_isolated(env):
    client, root = env["client"], env["root"]
    alice, bob = new_user(client, "alice"), new_user(client, "bob")
    assert alice != bob and new_user(client, "alice") == alice  # same name -> same gallery
    post(client, "/images/add", {"image_path": str(root / "album" / "a1.jpg")}, user_id=alice)
    post(client, "/images/add", {"image_path": str(root / "album" / "a2.jpg")}, user_id=bob)
    for uid, name in ((alice, "a1.jpg"), (bob, "a2.jpg")):
        results = post(client, "/images/search", {"query": "x", "top_k": 100}, user_id=uid).json()["results"]
        assert [os.path.basename(r["path"]) for r in results] == [name]
    bob_image = client.get("/images", params={"user_id": bob}, headers=AUTH).json()["images"][0]["id"]
    assert client.delete(f"/images/{bob_image}", params={"user_id": alice}, headers=AUTH).status_code == 404


def test_bad_inputs_get_clear_errors_and_change_nothing(env):
    client, root, outside = env["client"], env["root"], env["outside"]
    uid = new_user(client, "bad-inputs")
    post(client, "/images/add", {"image_path": str(root / "album" / "a3.jpg")}, user_id=uid)
    before = snapshot(client, uid)
    add, folder, search = "/images/add", "/images/add-folder", "/images/search"
    cases = [
        (add, {"image_path": str(outside / "secret.jpg")}, 403),
        (add, {"image_path": f"{root}/../outside/secret.jpg"}, 403),
        (add, {"image_path": str(root / "escape.jpg")}, 403),  # symlink out of the root
        (add, {"image_path": "/etc/passwd"}, 403),
        (add, {"image_path": str(root / "missing.jpg")}, 404),
        (add, {"image_path": str(root / "folder.jpg")}, 400),  # a directory given as a file
        (add, {"image_path": "album/a0.jpg"}, 400),  # relative
        (add, {"image_path": str(root / "notes.txt")}, 415),
        (add, {"image_path": str(root / "fake.jpg")}, 415),  # not an image
        (add, {"image_path": str(root / "truncated.jpg")}, 422),
        (add, {"image_path": str(root / "bomb.png")}, 413),  # decompression bomb
        (add, {"image_path": str(root / "a.jpg"), "extra": 1}, 422),
        (add, {}, 422),
        (folder, {"folder_path": str(outside)}, 403),
        (folder, {"folder_path": str(root / "nope")}, 404),
        (folder, {"folder_path": str(root / "album" / "a0.jpg")}, 400),  # a file given as a folder
        (search, {"query": ""}, 422),
        (search, {"query": "x", "top_k": 101}, 422),
        (search, {"query": "x", "top_k": 0}, 422),
        (search, {"query": "x", "offset": -1}, 422),
        (search, {"query": "x", "min_score": 2}, 422),
        (search, {"query": "x", "folder": str(outside)}, 403),
    ]
    for path, body, status in cases:
        response = post(client, path, body, user_id=uid)
        assert response.status_code == status, (path, body, response.status_code, response.text)
        assert "detail" in response.json()
    assert post(client, search, {"query": "x"}, user_id="no-such-user").status_code == 404
    assert post(client, add, {"image_path": str(root / "album" / "a4.jpg")}, user_id="no-such-user").status_code == 404
    assert client.post(search, params={"user_id": uid}, content=b"{not json", headers={**AUTH, "content-type": "application/json"}).status_code == 422
    assert post(client, search, {"query": "x"}).status_code == 422  # user_id missing
    big = json.dumps({"query": "x" * 10_000})
    too_big = client.post(search, params={"user_id": uid}, content=big, headers={**AUTH, "content-type": "application/json"})
    assert too_big.status_code == 413 and "too large" in too_big.json()["detail"]
    streamed = client.post(search, params={"user_id": uid}, headers={**AUTH, "content-type": "application/json"},
                           content=iter([big[:3000].encode(), big[3000:].encode()]))  # chunked: no Content-Length
    assert streamed.status_code == 413
    assert snapshot(client, uid) == before

    report = post(client, folder, {"folder_path": str(root)}, user_id=uid).json()  # failures listed, rest added
    failed = {os.path.basename(f["path"]): f["status"] for f in report["failed_files"]}
    assert failed == {"escape.jpg": 403, "fake.jpg": 415, "truncated.jpg": 422, "bomb.png": 413}
    assert report["added"] == 8 and report["unchanged"] == 1 and report["ignored"] == 1


def test_web_page_needs_no_key_but_its_data_does(env):
    client, root = env["client"], env["root"]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Smart Gallery" in page.text and "litserve running" not in page.text
    assert client.get("/web/app.js").status_code == 200 and client.get("/web/style.css").status_code == 200
    assert client.get("/web/../api.py").status_code == 404
    uid = new_user(client, "web")
    added = post(client, "/images/add", {"image_path": str(root / "album" / "a4.jpg")}, user_id=uid).json()
    for path in (f"/images/{added['id']}/thumbnail", f"/images/{added['id']}/file", f"/jobs/abc"):
        assert client.get(path, params={"user_id": uid}).status_code == 401, path
    assert client.get(f"/images/{added['id']}/thumbnail", params={"user_id": uid}, headers=AUTH).status_code == 200
    upload = client.post("/images/upload", params={"user_id": uid}, files={"file": ("a.jpg", b"x")})
    assert upload.status_code == 401


def test_hostile_inputs_are_4xx_and_change_nothing(env):
    """Issue 9: traversal and symlink escapes, bombs, a 1 GB file, polyglots, odd names, big bodies,
    out-of-range numbers and a folder of 50,000 empty files: each a 4xx (or a clean per-file
    failure in a folder), the store unchanged."""
    client, root, outside = env["client"], env["root"], env["outside"]
    uid = new_user(client, "hostile")
    post(client, "/images/add", {"image_path": str(root / "album" / "a0.jpg")}, user_id=uid)
    hostile = root / "hostile"
    hostile.mkdir()
    (hostile / "escape-dir").symlink_to(outside, target_is_directory=True)
    with open(hostile / "huge.jpg", "wb") as handle:  # 1 GB, sparse: costs no disk
        handle.truncate(1 << 30)
    zipped = hostile / "archive.jpg"
    import zipfile
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("x.html", "<script>alert(1)</script>")
    (hostile / "page.jpg").write_text("<!doctype html><html><script>alert(1)</script></html>")
    bomb_jpeg = hostile / "bomb.jpg"
    from PIL import Image
    Image.new("RGB", (16, 16)).save(bomb_jpeg, format="JPEG")
    data = bytearray(bomb_jpeg.read_bytes())  # the SOF0 header claims 60000 x 60000 pixels
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    bomb_jpeg.write_bytes(bytes(data))
    before = snapshot(client, uid)

    add, folder, search = "/images/add", "/images/add-folder", "/images/search"
    cases = [
        (add, {"image_path": str(hostile / "escape-dir" / "secret.jpg")}, 403),  # symlinked folder out of the root
        (add, {"image_path": f"{root}/album/../../outside/secret.jpg"}, 403),
        (add, {"image_path": str(root) + "/%2e%2e/outside/secret.jpg"}, 404),  # no URL decoding of paths
        (add, {"image_path": str(root / "album" / "a0.jpg") + "\x00.png"}, 400),
        (add, {"image_path": str(hostile / "huge.jpg")}, 413),
        (add, {"image_path": str(zipped)}, 415),  # polyglots: a ZIP and an HTML page named .jpg
        (add, {"image_path": str(hostile / "page.jpg")}, 415),
        (add, {"image_path": str(bomb_jpeg)}, 413),
        (add, {"image_path": str(root / "nö such\nfile .jpg")}, 404),
        (folder, {"folder_path": str(hostile / "escape-dir")}, 403),
        (search, {"query": "x", "top_k": -1}, 422),
        (search, {"query": "x", "top_k": 10**20}, 422),
        (search, {"query": "x", "offset": 10**30}, 422),
        (search, {"query": "x", "offset": -5}, 422),
    ]
    for path, body, status in cases:
        response = post(client, path, body, user_id=uid)
        assert response.status_code == status, (path, body, response.status_code, response.text)
    for params in ({"offset": 441566866722643584}, {"offset": -1}, {"limit": 0}, {"limit": 10**9}, {"limit": -3}):
        response = client.get("/images", params={"user_id": uid, **params}, headers=AUTH)
        assert response.status_code == 422, (params, response.text)
    ten_mb = json.dumps({"query": "x" * (10 * 1024 * 1024)})
    response = client.post(search, params={"user_id": uid}, content=ten_mb,
                           headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 413
    for image_id in ("..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "x" * 65):
        assert client.get(f"/images/{image_id}", params={"user_id": uid}, headers=AUTH).status_code in (404, 422)
    report = post(client, folder, {"folder_path": str(hostile)}, user_id=uid).json()
    assert report["added"] == 0 and {os.path.basename(f["path"]): f["status"] for f in report["failed_files"]} == {
        "huge.jpg": 413, "archive.jpg": 415, "page.jpg": 415, "bomb.jpg": 413}
    assert snapshot(client, uid) == before

    empty = root / "empty-files"  # 50,000 empty .jpg files: failed, listed up to 1,000, nothing stored
    empty.mkdir()
    for index in range(50_000):
        os.close(os.open(empty / f"e{index:05d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    started = time.monotonic()
    report = post(client, folder, {"folder_path": str(empty)}, user_id=uid)
    seconds = time.monotonic() - started
    assert report.status_code == 200, report.text
    body = report.json()
    assert (body["added"], body["failed"], len(body["failed_files"])) == (0, 50_000, 1000)
    assert body["failed_files"][0]["status"] == 422 and "empty file" in body["failed_files"][0]["reason"]
    assert seconds < 60, seconds
    assert snapshot(client, uid) == before

    odd = root / "odd names" / "ünïcødé 写真" / "new\nline and  spaces.jpg"  # legitimate names work
    write_image(odd, 4242)
    added = post(client, add, {"image_path": str(odd)}, user_id=uid)
    assert added.status_code == 200 and added.json()["path"] == str(odd), added.text
    found = post(client, search, {"query": "x", "top_k": 100}, user_id=uid).json()["results"]
    assert str(odd) in {r["path"] for r in found}
    served = client.get(f"/images/{added.json()['id']}/file", params={"user_id": uid}, headers=AUTH)
    assert served.status_code == 200 and served.headers["x-content-type-options"] == "nosniff"

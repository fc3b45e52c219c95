"""The image endpoints over real HTTP (`python -m serving` subprocess, allowed roots, real files):
thumbnails, original files, image details, search by image (stored id, server path, upload),
uploads with their limits, negative terms, and that another gallery's ids answer 404."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.serving_fixtures import ServerProcess, tiny_checkpoint, write_image, write_truncated_jpeg

MAX_UPLOAD = 300_000


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("images")
    root, outside, cwd = base / "root", base / "outside", base / "cwd"
    cwd.mkdir()
    for index in range(8):
        write_image(root / "album" / f"p{index}.jpg", 200 + index, size=(640, 480))
    write_image(root / "album" / "tall.png", 300, size=(120, 400))
    write_image(outside / "secret.jpg", 999)
    server = ServerProcess(tiny_checkpoint(1)[0], base / "db", cwd, f"allowed_roots=[{root}]",
                           f"max_upload_bytes={MAX_UPLOAD}").wait_ready()
    client = server.client()
    alice = client.post("/db/initialize", json={"user_name": "alice"}).json()["user_id"]
    bob = client.post("/db/initialize", json={"user_name": "bob"}).json()["user_id"]
    added = client.post("/images/add-folder", params={"user_id": alice}, json={"folder_path": str(root / "album")})
    assert added.status_code == 200 and added.json()["added"] == 9, added.text
    client.post("/images/add", params={"user_id": bob}, json={"image_path": str(root / "album" / "p0.jpg")})
    images = client.get("/images", params={"user_id": alice}).json()["images"]
    yield {"server": server, "client": client, "root": root, "outside": outside, "db": base / "db",
           "alice": alice, "bob": bob, "ids": {img["path"].rsplit("/", 1)[1]: img["id"] for img in images}}
    client.close()
    server.stop()


def test_thumbnail_is_a_cached_small_jpeg_with_validators(env):
    client, alice, ids = env["client"], env["alice"], env["ids"]
    url = f"/images/{ids['p1.jpg']}/thumbnail"
    first = client.get(url, params={"user_id": alice})
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert "max-age" in first.headers["cache-control"] and first.headers["etag"].startswith('"')
    thumb = Image.open(io.BytesIO(first.content))
    assert thumb.format == "JPEG" and thumb.size == (256, 192)
    cached = list((env["db"] / "thumbnails").rglob(f"{ids['p1.jpg']}-*.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == first.content
    again = client.get(url, params={"user_id": alice}, headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    tall = Image.open(io.BytesIO(client.get(f"/images/{ids['tall.png']}/thumbnail", params={"user_id": alice}).content))
    assert tall.size == (77, 256)


def test_original_file_and_details(env):
    client, alice, ids, root = env["client"], env["alice"], env["ids"], env["root"]
    png = client.get(f"/images/{ids['tall.png']}/file", params={"user_id": alice})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == (root / "album" / "tall.png").read_bytes() and "etag" in png.headers
    jpg = client.get(f"/images/{ids['p2.jpg']}/file", params={"user_id": alice})
    assert jpg.headers["content-type"] == "image/jpeg"
    assert client.get(f"/images/{ids['p2.jpg']}/file", params={"user_id": alice},
                      headers={"If-None-Match": jpg.headers["etag"]}).status_code == 304
    detail = client.get(f"/images/{ids['tall.png']}", params={"user_id": alice}).json()
    assert (detail["width"], detail["height"], detail["exists"]) == (120, 400, True)
    assert detail["path"] == str(root / "album" / "tall.png") and detail["size"] > 0 and detail["modified_at"] > 0


def test_another_gallerys_ids_are_not_found(env):
    client, bob, ids = env["client"], env["bob"], env["ids"]
    alice_only = ids["p3.jpg"]  # bob has only p0.jpg
    for path in (f"/images/{alice_only}/thumbnail", f"/images/{alice_only}/file", f"/images/{alice_only}"):
        response = client.get(path, params={"user_id": bob})
        assert response.status_code == 404, (path, response.text)
        assert "no image with id" in response.json()["detail"]
    by_id = client.post("/images/search-by-image", params={"user_id": bob}, json={"image_id": alice_only})
    assert by_id.status_code == 404
    unknown = client.get("/images/0123456789abcdef/thumbnail", params={"user_id": env["alice"]})
    assert unknown.status_code == 404 and unknown.json()["detail"] == by_id.json()["detail"].replace(
        alice_only, "0123456789abcdef")
    assert client.get(f"/images/{alice_only}/file", params={"user_id": "nobody"}).status_code == 404


def test_search_by_stored_image_path_and_upload(env):
    client, alice, ids, root = env["client"], env["alice"], env["ids"], env["root"]
    by_id = client.post("/images/search-by-image", params={"user_id": alice},
                        json={"image_id": ids["p4.jpg"], "top_k": 100})
    assert by_id.status_code == 200, by_id.text
    body = by_id.json()
    assert body["query"] == f"image:{ids['p4.jpg']}" and body["total_images"] == 9
    assert ids["p4.jpg"] not in {r["id"] for r in body["results"]} and len(body["results"]) == 8
    assert [r["rank"] for r in body["results"]] == list(range(1, 9))
    paged = client.post("/images/search-by-image", params={"user_id": alice},
                        json={"image_id": ids["p4.jpg"], "top_k": 3, "offset": 3}).json()
    assert [r["id"] for r in paged["results"]] == [r["id"] for r in body["results"][3:6]]

    by_path = client.post("/images/search-by-image", params={"user_id": alice},
                          json={"image_path": str(root / "album" / "p5.jpg"), "top_k": 3}).json()
    assert by_path["results"][0]["id"] == ids["p5.jpg"] and by_path["results"][0]["score"] > 0.999
    outside = client.post("/images/search-by-image", params={"user_id": alice},
                          json={"image_path": str(env["outside"] / "secret.jpg")})
    assert outside.status_code == 403

    data = (root / "album" / "p6.jpg").read_bytes()
    uploaded = client.post("/images/search-by-image", params={"user_id": alice},
                           files={"file": ("query.jpg", data, "image/jpeg")}, data={"top_k": "2"})
    assert uploaded.status_code == 200, uploaded.text
    result = uploaded.json()
    assert result["query"] == "upload:query.jpg" and len(result["results"]) == 2
    assert result["results"][0]["id"] == ids["p6.jpg"] and result["results"][0]["score"] > 0.999

    for body, status in (({"image_id": ids["p4.jpg"], "image_path": str(root / "album" / "p5.jpg")}, 422),
                         ({}, 422), ({"image_id": ids["p4.jpg"], "top_k": 0}, 422), ({"nope": 1}, 422)):
        assert client.post("/images/search-by-image", params={"user_id": alice}, json=body).status_code == status
    no_file = client.post("/images/search-by-image", params={"user_id": alice}, files={"other": ("x", b"y")})
    assert no_file.status_code == 422
    text = client.post("/images/search-by-image", params={"user_id": alice}, files={"file": ("a.jpg", b"hello")})
    assert text.status_code == 415


def test_upload_saves_under_the_store_and_indexes(env, tmp_path):
    client, server, db = env["client"], env["server"], env["db"]
    uid = client.post("/db/initialize", json={"user_name": "uploader"}).json()["user_id"]
    picture = write_image(tmp_path / "holiday photo.png", 4242, size=(200, 150))
    sent = client.post("/images/upload", params={"user_id": uid},
                       files={"file": ("holiday photo.png", picture.read_bytes(), "image/png")})
    assert sent.status_code == 200, sent.text
    body = sent.json()
    assert body["status"] == "added" and body["path"].startswith(str((db / "uploads" / uid).resolve()))
    assert body["path"].endswith("-holiday_photo.png")
    found = client.post("/images/search", params={"user_id": uid}, json={"query": "x"}).json()["results"]
    assert [r["id"] for r in found] == [body["id"]]
    assert client.get(f"/images/{body['id']}/thumbnail", params={"user_id": uid}).status_code == 200
    again = client.post("/images/upload", params={"user_id": uid}, files={"file": ("other.png", picture.read_bytes())})
    assert again.json()["status"] == "duplicate" and again.json()["duplicate_of"]["id"] == body["id"]
    assert len(list((db / "uploads" / uid).iterdir())) == 1  # the duplicate was not kept

    # A JPEG sent under a .png name is stored as what it is.
    jpeg = io.BytesIO()
    Image.open(picture).convert("RGB").rotate(90).save(jpeg, format="JPEG")
    renamed = client.post("/images/upload", params={"user_id": uid}, files={"file": ("x.png", jpeg.getvalue())})
    assert renamed.status_code == 200 and renamed.json()["path"].endswith("-x.jpg")

    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(big, format="PNG")
    assert len(big.getvalue()) > MAX_UPLOAD
    too_big = client.post("/images/upload", params={"user_id": uid}, files={"file": ("big.png", big.getvalue())})
    assert too_big.status_code == 413 and "too large" in too_big.json()["detail"]
    text = client.post("/images/upload", params={"user_id": uid}, files={"file": ("notes.jpg", b"plain text")})
    assert text.status_code == 415 and "notes.jpg" in text.json()["detail"]
    truncated = write_truncated_jpeg(tmp_path / "cut.jpg")
    cut = client.post("/images/upload", params={"user_id": uid}, files={"file": ("cut.jpg", truncated.read_bytes())})
    assert cut.status_code == 422 and "cut.jpg" in cut.json()["detail"]
    assert client.post("/images/upload", params={"user_id": uid}, files={"file": ("e.jpg", b"")}).status_code == 422
    assert client.post("/images/upload", params={"user_id": "nobody"},
                       files={"file": ("a.png", picture.read_bytes())}).status_code == 404
    assert client.get("/images", params={"user_id": uid}).json()["total"] == 2
    assert not list((db / "tmp").iterdir())


def test_negative_terms_subtract_the_negative_embedding(env):
    client, alice = env["client"], env["alice"]

    def scores(body):
        response = client.post("/images/search", params={"user_id": alice}, json={"top_k": 100, **body})
        assert response.status_code == 200, response.text
        return response.json()

    plain = {r["id"]: r["score"] for r in scores({"query": "red boat"})["results"]}
    away = {r["id"]: r["score"] for r in scores({"query": "people"})["results"]}
    for body in ({"query": "red boat -people", "negative_weight": 0.8},
                 {"query": "red boat", "negative": "people", "negative_weight": 0.8}):
        result = scores(body)
        assert result["negative_terms"] == ["people"] and result["query"] == body["query"]
        got = {r["id"]: r["score"] for r in result["results"]}
        expected = {i: plain[i] - 0.8 * away[i] for i in plain}  # up to one positive factor, |q - w n|
        assert sorted(got, key=got.get) == sorted(expected, key=expected.get)
        ratios = np.array([got[i] / expected[i] for i in got])
        assert np.allclose(ratios, ratios[0], rtol=1e-3)
    unweighted = {r["id"]: r["score"] for r in scores({"query": "red boat -people", "negative_weight": 0})["results"]}
    assert unweighted == pytest.approx(plain, abs=1e-5)
    only = client.post("/images/search", params={"user_id": alice}, json={"query": "-people"})
    assert only.status_code == 422 and "only negative" in only.json()["detail"]
    hyphen = scores({"query": "t-shirt"})
    assert hyphen["negative_terms"] == []


def test_openapi_and_web_page(env):
    client = env["client"]
    spec = client.get("/openapi.json").json()
    for path, method in [("/images/{image_id}/thumbnail", "get"), ("/images/{image_id}/file", "get"),
                         ("/images/search-by-image", "post"), ("/images/upload", "post"), ("/jobs/{job_id}", "get"),
                         ("/jobs/{job_id}", "delete"), ("/images/{image_id}", "get")]:
        assert method in spec["paths"][path], (path, method)
    by_image = spec["paths"]["/images/search-by-image"]["post"]
    assert set(by_image["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert by_image["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("SearchResponse")
    assert "202" in spec["paths"]["/images/add-folder"]["post"]["responses"]
    assert "image/*" in spec["paths"]["/images/{image_id}/thumbnail"]["get"]["responses"]["200"]["content"]
    for name in ("JobResponse", "JobStartedResponse", "ImageDetailResponse"):
        assert name in spec["components"]["schemas"], name
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower() or "<!doctype html" in page.text.lower()
    assert client.get("/web/app.js").status_code == 200

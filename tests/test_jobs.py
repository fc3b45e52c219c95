"""Background add-folder jobs over real HTTP (`python -m serving` subprocess, real images):
202 + job id, progress, searches answered while a job runs, cancel leaving a consistent store
(every record's file exists and has its embedding), re-adding finishing the rest, and another
gallery's job ids answering 404."""

from __future__ import annotations

import os
import time

import pytest

from serving.store import GalleryStore
from tests.serving_fixtures import ServerProcess, tiny_checkpoint, write_image

COUNT = 160


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("jobs")
    pictures, cwd = base / "pictures", base / "cwd"
    cwd.mkdir()
    for index in range(COUNT):
        write_image(pictures / "many" / f"m{index:03d}.jpg", 3000 + index, size=(512, 384))
    (pictures / "many" / "broken.jpg").write_text("not an image")
    for index in range(5):
        write_image(pictures / "few" / f"f{index}.png", 4000 + index)
    server = ServerProcess(tiny_checkpoint(1)[0], base / "db", cwd, "ingest.batch_size=4",
                           "ingest.prefetch_batches=0").wait_ready()
    yield {"server": server, "client": server.client(), "pictures": pictures, "db": base / "db"}
    server.stop()


def wait_for(client, uid, job_id, states=("done", "failed", "cancelled"), timeout=120.0, until=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}", params={"user_id": uid})
        assert job.status_code == 200, job.text
        body = job.json()
        if body["state"] in states or (until is not None and until(body)):
            return body
        time.sleep(0.05)
    raise TimeoutError(body)


def test_small_job_reports_done_with_counts(env):
    client, pictures = env["client"], env["pictures"]
    uid = client.post("/db/initialize", json={"user_name": "small"}).json()["user_id"]
    started = client.post("/images/add-folder", params={"user_id": uid, "background": "true"},
                          json={"folder_path": str(pictures / "few")})
    assert started.status_code == 202, started.text
    assert set(started.json()) == {"job_id", "state"} and started.json()["state"] in ("queued", "running")
    job = wait_for(client, uid, started.json()["job_id"])
    assert job["state"] == "done" and (job["total"], job["done"], job["added"], job["failed"]) == (5, 5, 5, 0)
    assert job["kind"] == "add-folder" and job["folder"] == str(pictures / "few") and job["finished_at"]
    assert client.post("/images/search", params={"user_id": uid}, json={"query": "x"}).json()["total_images"] == 5
    # Synchronous add-folder is unchanged: same body, 200, the full report.
    sync = client.post("/images/add-folder", params={"user_id": uid}, json={"folder_path": str(pictures / "few")})
    assert sync.status_code == 200 and sync.json()["unchanged"] == 5
    # The request is checked before a job is made.
    missing = client.post("/images/add-folder", params={"user_id": uid, "background": True},
                          json={"folder_path": str(pictures / "nope")})
    assert missing.status_code == 404
    assert client.post("/images/add-folder", params={"user_id": "nobody", "background": True},
                       json={"folder_path": str(pictures / "few")}).status_code == 404


def test_cancel_leaves_a_consistent_store_and_readding_finishes(env):
    client, pictures, server = env["client"], env["pictures"], env["server"]
    uid = client.post("/db/initialize", json={"user_name": "cancelled"}).json()["user_id"]
    other = client.post("/db/initialize", json={"user_name": "someone-else"}).json()["user_id"]
    job_id = client.post("/images/add-folder", params={"user_id": uid, "background": True},
                         json={"folder_path": str(pictures / "many")}).json()["job_id"]
    running = wait_for(client, uid, job_id, until=lambda b: b["state"] == "running" and b["done"] >= 8)
    assert running["total"] == COUNT + 1 and running["done"] < running["total"]

    # Searches are answered while the job runs, and see what it stored so far.
    during = client.post("/images/search", params={"user_id": uid}, json={"query": "a dog", "top_k": 5})
    assert during.status_code == 200 and 0 < during.json()["total_images"] <= COUNT

    # Another gallery's job id is not found, for cancelling (before the real cancel) and reading.
    assert client.delete(f"/jobs/{job_id}", params={"user_id": other}).status_code == 404
    cancel = client.delete(f"/jobs/{job_id}", params={"user_id": uid})
    assert cancel.status_code == 200 and cancel.json()["state"] in ("running", "cancelled")
    assert client.get(f"/jobs/{job_id}", params={"user_id": other}).status_code == 404
    assert client.get("/jobs/0123abcd", params={"user_id": uid}).status_code == 404
    job = wait_for(client, uid, job_id)
    assert job["state"] == "cancelled" and job["done"] < job["total"], job
    assert client.delete(f"/jobs/{job_id}", params={"user_id": uid}).json()["state"] == "cancelled"  # idempotent
    stored = client.get("/images", params={"user_id": uid, "limit": 1000}).json()
    assert 0 < stored["total"] < COUNT and stored["total"] == job["added"]
    for image in stored["images"]:
        assert os.path.isfile(image["path"])
        similar = client.post("/images/search-by-image", params={"user_id": uid}, json={"image_id": image["id"]})
        assert similar.status_code == 200  # its embedding is stored

    rest = client.post("/images/add-folder", params={"user_id": uid, "background": True},
                       json={"folder_path": str(pictures / "many")}).json()["job_id"]
    final = wait_for(client, uid, rest)
    assert final["state"] == "done" and final["unchanged"] == stored["total"]
    assert final["added"] == COUNT - stored["total"] and final["failed"] == 1
    assert final["failed_files"][0]["path"].endswith("broken.jpg") and final["failed_files"][0]["status"] == 415
    assert final["done"] == final["total"] == COUNT + 1 and final["images_per_second"] > 0

    # Checked in the store itself once the server is stopped: whole records only.
    code, survivors = server.stop()
    assert code == 0 and not survivors
    with GalleryStore(env["db"]) as store:
        user = store.get_user(uid)
        got = store.collection(user).get(include=["metadatas", "embeddings"])
        assert len(got["ids"]) == COUNT
        assert all(len(vector) > 0 for vector in got["embeddings"])
        assert all(os.path.isfile(meta["path"]) for meta in got["metadatas"])

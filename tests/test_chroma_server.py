"""Two gallery workers against one real `chroma run` server (store=server).

What a deployment with several serving machines relies on: a gallery created on one worker is
known to the other, an image added on one is found by a search on the other right after, the
original four requests work unchanged, and the users live in the Chroma server (no users.json
on any machine). Each worker gets its own db_path, as separate machines would.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field

import httpx
import pytest
from hydra import compose, initialize_config_dir

from serving.config import ServeSettings
from serving.store_backend import USERS_COLLECTION, ChromaRegistry, ServerBackend, StoreUnavailableError
from tests.chroma_fixtures import ChromaServer
from tests.serving_fixtures import REPO, ServerProcess, free_port, tiny_checkpoint, write_image

JSON = {"Content-Type": "application/json"}


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url, content=json.dumps(body), headers=JSON, timeout=120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    pictures = base / "pictures"
    for index in range(12):
        write_image(pictures / "holiday" / f"beach{index}.jpg", index)
    chroma = ChromaServer(base / "chroma").wait_ready()
    checkpoint, _ = tiny_checkpoint(1)
    workers = []
    try:
        for name in ("a", "b"):
            (base / f"cwd-{name}").mkdir()
            workers.append(ServerProcess(checkpoint, base / f"db-{name}", base / f"cwd-{name}", *chroma.overrides))
        for worker in workers:
            worker.wait_ready()
        yield {"chroma": chroma, "a": workers[0], "b": workers[1], "pictures": pictures, "base": base}
    finally:
        for worker in workers:
            worker.stop()
        chroma.stop()


def test_original_four_requests_against_the_chroma_server(cluster):
    url, pictures = cluster["a"].url, cluster["pictures"]
    init = post(f"{url}/db/initialize", {"user_name": "my_gallery"})
    assert init.status_code == 200, init.text
    uid = init.json()["user_id"]
    added = post(f"{url}/images/add?user_id={uid}", {"image_path": str(pictures / "holiday" / "beach0.jpg")})
    assert added.status_code == 200 and added.json()["status"] == "added", added.text
    folder = post(f"{url}/images/add-folder?user_id={uid}", {"folder_path": str(pictures / "holiday")})
    assert folder.status_code == 200, folder.text
    assert (folder.json()["added"], folder.json()["unchanged"], folder.json()["failed"]) == (11, 1, 0)
    for worker in (cluster["a"], cluster["b"]):  # the other worker serves the same gallery
        search = post(f"{worker.url}/images/search?user_id={uid}", {"query": "a person walking on the beach"})
        assert search.status_code == 200, search.text
        results = search.json()["results"]
        assert len(results) == 10 and all(r["path"].startswith(str(pictures / "holiday")) for r in results)
    again = post(f"{cluster['b'].url}/db/initialize", {"user_name": "my_gallery"})
    assert again.status_code == 200 and again.json()["user_id"] == uid


def test_search_on_one_worker_right_after_an_add_on_the_other(cluster):
    a, b, pictures = cluster["a"], cluster["b"], cluster["pictures"]
    uid = post(f"{a.url}/db/initialize", {"user_name": "read-your-writes"}).json()["user_id"]
    for index in range(6):
        writer, reader = (a, b) if index % 2 == 0 else (b, a)
        image = write_image(pictures / "fresh" / f"f{index}.png", 5000 + index)
        added = post(f"{writer.url}/images/add?user_id={uid}", {"image_path": str(image)})
        assert added.status_code == 200, added.text
        found = post(f"{reader.url}/images/search?user_id={uid}", {"query": "x", "top_k": 100}).json()
        assert added.json()["id"] in {r["id"] for r in found["results"]}
        assert found["total_images"] == index + 1


def test_the_same_new_gallery_created_on_both_workers_at_once_is_one_gallery(cluster):
    answers = {}

    def initialize(worker):
        answers[worker] = post(f"{cluster[worker].url}/db/initialize", {"user_name": "race"}).json()["user_id"]

    threads = [threading.Thread(target=initialize, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers["a"] == answers["b"]
    records = cluster["chroma"].client().get_collection(USERS_COLLECTION).get(include=["metadatas"])
    assert [m["user_name"] for m in records["metadatas"]].count("race") == 1


def test_users_live_in_the_chroma_server_not_in_a_file(cluster):
    names = {m["user_name"] for m in
             cluster["chroma"].client().get_collection(USERS_COLLECTION).get(include=["metadatas"])["metadatas"]}
    assert {"my_gallery", "read-your-writes"} <= names
    for worker in ("a", "b"):
        assert not (cluster["base"] / f"db-{worker}" / "users.json").exists()
        assert not (cluster["base"] / f"db-{worker}" / "chroma").exists()


@dataclass
class RecordWithMoreFields:
    """A User as another version may extend it (e.g. key hashes): every field must round-trip."""
    user_id: str
    user_name: str
    collection: str
    created_at: float
    key_hash: str | None = None
    scopes: list = field(default_factory=list)


def test_the_registry_keeps_every_field_of_the_record(cluster):
    registry = ChromaRegistry(cluster["chroma"].client(), "registry_fields_test", RecordWithMoreFields)
    user = RecordWithMoreFields("u1", "fields", "gallery_u1", 1.5, key_hash="ab" * 32, scopes=["read", "write"])
    assert registry.claim(user) == user
    assert registry.claim(RecordWithMoreFields("u2", "fields", "gallery_u2", 2.0)) == user  # the name is taken
    registry.save(RecordWithMoreFields("u1", "fields", "gallery_u1b", 1.5, key_hash=None))
    assert registry.get("u1") == RecordWithMoreFields("u1", "fields", "gallery_u1b", 1.5)  # None replaces a value
    assert registry.find("nobody") is None and registry.get("u2") is None


def test_store_group_composes_to_the_server_backend():
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="serve", overrides=["checkpoint=/x", "store=server", "store.host=10.0.0.5",
                                                      "store.port=8123"])
        default = compose(config_name="serve", overrides=["checkpoint=/x"])
    settings = ServeSettings.from_hydra(cfg)
    assert settings.store["_target_"] == "serving.store_backend.ServerBackend"
    assert (settings.store["host"], settings.store["port"]) == ("10.0.0.5", 8123)
    assert ServeSettings.from_hydra(default).store["_target_"] == "serving.store_backend.EmbeddedBackend"


def test_an_unreachable_chroma_server_is_one_clear_error(tmp_path):
    backend = ServerBackend(port=free_port(), connect_timeout_s=0.5)
    with pytest.raises(StoreUnavailableError, match="chroma run"):
        backend.connect(tmp_path)

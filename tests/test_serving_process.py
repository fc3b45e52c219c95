"""The real thing: `python -m serving` as a subprocess on 127.0.0.1, spoken to over HTTP.

Covers the original requests as a curl user sends them, consistency across two HTTP processes,
concurrent searches during an add-folder, clean SIGTERM/SIGINT shutdown with no surviving
child process, persistence across restarts, and a model change (409 -> re-index).
The last test stops the module's server, so it stays last.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx
import pytest

from serving.store import GalleryStore
from tests.serving_fixtures import PYTHON, REPO, ServerProcess, tiny_checkpoint, write_image

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("proc")
    cwd, db, pictures = base / "cwd", base / "db", base / "pictures"
    cwd.mkdir()
    for index in range(12):
        write_image(pictures / "holiday" / f"beach{index}.jpg", index)
    for index in range(80):
        write_image(pictures / "bulk" / f"b{index:03d}.jpg", 1000 + index, size=(640, 480))
    checkpoint_a, model_a = tiny_checkpoint(1)
    checkpoint_b, model_b = tiny_checkpoint(2)
    server = ServerProcess(checkpoint_a, db, cwd, "num_api_servers=2").wait_ready()
    state = {"server": server, "cwd": cwd, "db": db, "pictures": pictures, "a": (checkpoint_a, model_a),
             "b": (checkpoint_b, model_b)}
    yield state
    state["server"].stop()


def curl_post(url: str, body: str) -> httpx.Response:
    """What `curl -X POST URL -H 'Content-Type: application/json' -d BODY` sends: a fresh connection each time."""
    return httpx.post(url, content=body, headers=JSON, timeout=120)


def test_original_requests_over_http(env):
    url = env["server"].url
    pictures = env["pictures"]
    init = curl_post(f"{url}/db/initialize", '{"user_name": "my_gallery"}')
    assert init.status_code == 200, init.text
    uid = init.json()["user_id"]
    assert len(uid) >= 32

    added = curl_post(f"{url}/images/add?user_id={uid}", json.dumps({"image_path": str(pictures / "holiday" / "beach0.jpg")}))
    assert added.status_code == 200 and added.json()["status"] == "added", added.text
    folder = curl_post(f"{url}/images/add-folder?user_id={uid}", json.dumps({"folder_path": str(pictures / "holiday")}))
    assert folder.status_code == 200, folder.text
    assert (folder.json()["added"], folder.json()["unchanged"], folder.json()["failed"]) == (11, 1, 0)
    search = curl_post(f"{url}/images/search?user_id={uid}", '{"query": "a person walking on the beach at sunset"}')
    assert search.status_code == 200, search.text
    results = search.json()["results"]
    assert len(results) == 10 and all(r["path"].startswith(str(pictures / "holiday")) for r in results)
    assert [r["rank"] for r in results] == list(range(1, 11))
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/docs").status_code == 200


def test_search_right_after_add_sees_it_through_every_http_process(env):
    url, pictures = env["server"].url, env["pictures"]
    uid = curl_post(f"{url}/db/initialize", '{"user_name": "read-your-writes"}').json()["user_id"]
    for index in range(8):
        image = write_image(pictures / "fresh" / f"f{index}.png", 5000 + index)
        added = curl_post(f"{url}/images/add?user_id={uid}", json.dumps({"image_path": str(image)})).json()
        for _ in range(2):  # new connections land on either HTTP process
            found = curl_post(f"{url}/images/search?user_id={uid}", json.dumps({"query": "x", "top_k": 100})).json()
            assert added["id"] in {r["id"] for r in found["results"]}
            assert found["total_images"] == index + 1


def test_concurrent_searches_during_add_folder(env):
    url, pictures = env["server"].url, env["pictures"]
    uid = curl_post(f"{url}/db/initialize", '{"user_name": "busy"}').json()["user_id"]
    curl_post(f"{url}/images/add-folder?user_id={uid}", json.dumps({"folder_path": str(pictures / "holiday")}))
    done = threading.Event()
    add_result = {}

    def add_folder():
        add_result["response"] = curl_post(f"{url}/images/add-folder?user_id={uid}",
                                           json.dumps({"folder_path": str(pictures / "bulk")}))
        add_result["finished"] = time.monotonic()
        done.set()

    answers, errors = [], []

    def searcher(n: int):
        with httpx.Client(base_url=url, timeout=120) as client:
            count = 0
            while count < 3 or (not done.is_set() and count < 40):
                try:
                    response = client.post("/images/search", params={"user_id": uid},
                                           json={"query": f"query {n} {count}", "top_k": 5})
                    answers.append((time.monotonic(), response.status_code, response.json()))
                except Exception as error:  # pragma: no cover - reported below
                    errors.append(repr(error))
                count += 1

    adder = threading.Thread(target=add_folder)
    adder.start()
    threads = [threading.Thread(target=searcher, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads + [adder]:
        thread.join(180)
    assert not errors, errors[:3]
    assert add_result["response"].status_code == 200 and add_result["response"].json()["added"] == 80
    assert len(answers) >= 60
    for _, status, body in answers:
        assert status == 200, body
        ranks, scores = [r["rank"] for r in body["results"]], [r["score"] for r in body["results"]]
        assert ranks == list(range(1, 6)) and scores == sorted(scores, reverse=True)
        assert 12 <= body["total_images"] <= 92
    during = [a for a in answers if a[0] < add_result["finished"]]
    assert during, "no search was answered while the add-folder ran"
    final = curl_post(f"{url}/images/search?user_id={uid}", '{"query": "x"}').json()
    assert final["total_images"] == 92


def test_refuses_public_bind_without_key_and_roots(env):
    checkpoint, _ = env["a"]
    result = subprocess.run([PYTHON, "-m", "serving", f"checkpoint={checkpoint}", "host=0.0.0.0",
                             f"db_path={env['db']}-other"], cwd=env["cwd"], capture_output=True, text=True,
                            timeout=60, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "refusing to bind to 0.0.0.0" in result.stderr and "API key" in result.stderr


def test_restart_signals_and_model_change(env):
    """SIGTERM, restart (persistence), SIGINT, restart with another model (409), re-index."""
    server, pictures, db, cwd = env["server"], env["pictures"], env["db"], env["cwd"]
    (checkpoint_a, model_a), (checkpoint_b, model_b) = env["a"], env["b"]
    uid = curl_post(f"{server.url}/db/initialize", '{"user_name": "persistent"}').json()["user_id"]
    curl_post(f"{server.url}/images/add-folder?user_id={uid}", json.dumps({"folder_path": str(pictures / "holiday")}))
    query = json.dumps({"query": "sunset", "top_k": 12})
    before = curl_post(f"{server.url}/images/search?user_id={uid}", query).json()["results"]

    code, survivors = server.stop(signal.SIGTERM)
    assert code == 0 and not survivors, (code, survivors, server.log()[-3000:])
    assert sorted(p.name for p in cwd.iterdir() if not p.name.startswith("server-")) == []  # no client.py, no outputs/

    tmp = cwd.parent / "tmp"  # where the server puts the socket of its worker link
    tmp.mkdir()
    again = env["server"] = ServerProcess(checkpoint_a, db, cwd, env={"TMPDIR": str(tmp)}).wait_ready()
    assert [p.name for p in tmp.glob("smart-gallery-*/*")] == ["worker.sock"]
    after = curl_post(f"{again.url}/images/search?user_id={uid}", query).json()["results"]
    assert [(r["id"], round(r["score"], 5)) for r in after] == [(r["id"], round(r["score"], 5)) for r in before]
    code, survivors = again.stop(signal.SIGINT)
    assert code == 0 and not survivors, (code, survivors, again.log()[-3000:])
    assert list(tmp.glob("smart-gallery-*")) == []  # the socket folder is removed at exit

    # Without the direct link every request takes LitServe's queue; the answers are the same.
    other = env["server"] = ServerProcess(checkpoint_b, db, cwd, "search.direct_link=false").wait_ready()
    url = other.url
    refused = curl_post(f"{url}/images/search?user_id={uid}", query)
    assert refused.status_code == 409 and model_a in refused.json()["detail"] and "reindex" in refused.json()["detail"]
    new_image = write_image(pictures / "later" / "l0.jpg", 7000)
    assert curl_post(f"{url}/images/add?user_id={uid}", json.dumps({"image_path": str(new_image)})).status_code == 409
    info = httpx.get(f"{url}/db/info", params={"user_id": uid}).json()
    assert info["needs_reindex"] and info["model_id"] == model_a and info["server_model_id"] == model_b
    reindexed = httpx.post(f"{url}/db/reindex", params={"user_id": uid}, timeout=120)
    assert reindexed.status_code == 200, reindexed.text
    assert (reindexed.json()["reindexed"], reindexed.json()["model_id"]) == (12, model_b)
    found = curl_post(f"{url}/images/search?user_id={uid}", query)
    assert found.status_code == 200 and len(found.json()["results"]) == 12
    assert curl_post(f"{url}/images/add?user_id={uid}", json.dumps({"image_path": str(new_image)})).json()["status"] == "added"
    code, survivors = other.stop(signal.SIGTERM)
    assert code == 0 and not survivors

    # The other galleries still hold model A's vectors: the offline CLI re-indexes them all.
    cli = subprocess.run([PYTHON, "-m", "serving.reindex", f"checkpoint={checkpoint_b}", f"db_path={db}", "log_level=warning"],
                         cwd=cwd, capture_output=True, text=True, timeout=180, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert cli.returncode == 0, cli.stderr
    assert {json.loads(line)["user_name"] for line in cli.stdout.splitlines() if line.startswith("{")} == \
        {"my_gallery", "read-your-writes", "busy"}
    with GalleryStore(db) as store:
        assert {store.model_id(user) for user in store.users()} == {model_b}

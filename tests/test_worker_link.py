"""The direct link between the HTTP process and the gallery worker (serving/worker_link.py),
over a real Unix socket: answers reach their own callers, errors come back as raised, a worker
that is not listening is reported before anything is sent, one that dies mid-answer fails the
calls it had. (The link inside the real server is exercised by every search of
tests/test_serving_process.py; the queue path by its restart with `search.direct_link=false`.)"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi import HTTPException

from serving import worker_link
from serving.api import GalleryAPI
from serving.config import ServeSettings
from serving.worker_link import LinkClient, LinkDown, LinkServer, socket_path


class Unpicklable(Exception):
    def __init__(self):
        super().__init__("carries a lock")
        self.lock = threading.Lock()


def handle(request: dict, sent_at: float) -> dict:
    if request["op"] == "missing":
        raise HTTPException(404, "unknown user_id", headers={"X-Why": "test"})
    if request["op"] == "broken":
        raise Unpicklable()
    time.sleep(request.get("sleep", 0))
    return {"echo": request["n"], "waited": time.monotonic() - sent_at}


@pytest.fixture
def link(tmp_path):
    executor = ThreadPoolExecutor(16)
    path = socket_path(str(tmp_path))
    LinkServer(path, handle, executor).start()
    yield path
    executor.shutdown(wait=False)


def test_answers_reach_their_own_callers_and_errors_come_back(link):
    async def main():
        client = LinkClient(link)
        # Answers finish in another order than they were sent, all on one connection.
        calls = [client.call({"op": "echo", "n": n, "sleep": random.uniform(0, 0.05)}) for n in range(40)]
        answers = await asyncio.gather(*calls)
        assert [result["echo"] for ok, result in answers] == list(range(40)) and all(ok for ok, _ in answers)
        assert all(0 <= result["waited"] < 5 for _, result in answers)

        ok, error = await client.call({"op": "missing"})
        assert not ok and isinstance(error, HTTPException)
        assert (error.status_code, error.detail, error.headers) == (404, "unknown user_id", {"X-Why": "test"})
        ok, error = await client.call({"op": "broken"})  # cannot be pickled: its repr comes back
        assert not ok and isinstance(error, RuntimeError) and "Unpicklable" in str(error)

    asyncio.run(main())


def test_the_link_outlives_garbage_collection_on_uvloop(tmp_path):
    """The worker runs uvloop, which closes a listening socket whose Server object is collected:
    the link then went down after the first ingest and every search fell back to the queue."""
    import gc

    import uvloop

    executor = ThreadPoolExecutor(2)
    path = socket_path(str(tmp_path))
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        LinkServer(path, handle, executor).start()
        gc.collect()
        time.sleep(0.2)  # the link thread's loop runs the close, if there is one
        assert asyncio.run(LinkClient(path).call({"op": "echo", "n": 3}))[1]["echo"] == 3
    finally:
        asyncio.set_event_loop_policy(previous)
        executor.shutdown(wait=False)


def test_a_worker_not_listening_is_reported_before_sending(tmp_path, monkeypatch):
    monkeypatch.setattr(worker_link, "RETRY_CONNECT_S", 0.3)
    path = socket_path(str(tmp_path))

    async def main():
        client = LinkClient(path)
        with pytest.raises(LinkDown, match="cannot reach"):
            await client.call({"op": "echo", "n": 1})
        with pytest.raises(LinkDown, match="not up"):  # no new attempt for RETRY_CONNECT_S
            await client.call({"op": "echo", "n": 1})
        executor = ThreadPoolExecutor(2)
        LinkServer(path, handle, executor).start()
        await asyncio.sleep(0.35)
        assert await client.call({"op": "echo", "n": 2}) == (True, {"echo": 2, "waited": pytest.approx(0, abs=1)})
        executor.shutdown(wait=False)

    asyncio.run(main())


def test_a_worker_gone_mid_answer_fails_the_calls_it_had(tmp_path):
    path = socket_path(str(tmp_path))

    async def main():
        async def dies_after_reading(reader, writer):  # a worker process that exits mid-request
            await reader.read(1)
            writer.close()

        server = await asyncio.start_unix_server(dies_after_reading, path=path)
        client = LinkClient(path)
        with pytest.raises(ConnectionError, match="closed the link"):
            await asyncio.wait_for(client.call({"op": "echo", "n": 1}), 10)
        server.close()

    asyncio.run(main())


def test_worker_answers_504_to_a_request_that_waited_past_the_timeout(tmp_path):
    api = GalleryAPI(ServeSettings(checkpoint=str(tmp_path), timeout=2.0))
    with pytest.raises(HTTPException) as error:
        api._answer_link({"op": "search", "args": {}}, sent_at=time.monotonic() - 3.0)
    assert error.value.status_code == 504

"""A direct Unix-socket link from the HTTP process to the gallery worker, for short reads.

Why: through LitServe's queues a request crosses three processes (HTTP process -> the
multiprocessing manager -> the worker, and back through a response queue and a consumer
thread). Over this link the HTTP process writes one frame to the worker and reads one back.
At 100k images on the 2-core machine (three paired runs of scripts/bench_serving.py,
docs/benchmarks.md): a sequential search p50 15.6-15.9 -> 14.2-14.5 ms; 50 clients 148-150 ->
168-176 searches/s, p99 410-431 -> 346-382 ms; server CPU per search 12.3-12.4 -> 10.5-10.9 ms.

What goes over it: the operations in `LINK_OPS` of serving/api.py (searches, listings,
thumbnails: what a person waits for), when `search.direct_link` is on. Everything else, and
every request while the link is down (the worker still starting, or gone), takes LitServe's
queue as before; both end in the same worker thread pool and the same `_dispatch`.

Frames are a 4-byte length and a pickle, as on LitServe's own queues. The socket lives in a
folder only this user can open (mode 0700, from `tempfile.mkdtemp`), so only processes that
could already read this server's memory can write to it. Requests are multiplexed on one
connection per HTTP process by a request number.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import struct
import threading
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("!I")
RETRY_CONNECT_S = 1.0  # while the worker is not listening, requests take the queue; try again after this


class LinkDown(Exception):
    """The worker cannot be reached over the link (yet, or any more); nothing was sent."""


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(length))


def _frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(repr(error))


class LinkServer:
    """The worker's end: answers each frame `(number, sent_at, request)` with `(number, ok, result)`.

    `handle(request, sent_at)` runs on `executor` and returns the response dict or raises;
    the exception itself is sent back (the HTTP side raises it as LitServe's path would)."""

    def __init__(self, path: str, handle: Callable[[dict, float], dict], executor):
        self.path = path
        self._handle = handle
        self._executor = executor
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server = None  # held: uvloop closes a listening socket whose Server is garbage-collected

    def start(self) -> None:
        """Listen on a thread of its own, with its own event loop (of the current policy: uvloop
        in the worker); returns once the socket accepts."""
        threading.Thread(target=self._run, name="worker-link", daemon=True).start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            self._server = loop.run_until_complete(asyncio.start_unix_server(self._serve, path=self.path))
        except BaseException as error:
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks = set()
        try:
            while True:
                number, sent_at, request = await _read_frame(reader)
                task = asyncio.ensure_future(self._answer(writer, number, sent_at, request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the HTTP process closed the link
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, number: int, sent_at: float, request: dict) -> None:
        loop = asyncio.get_running_loop()
        try:
            reply = (number, True, await loop.run_in_executor(self._executor, self._handle, request, sent_at))
        except Exception as error:
            reply = (number, False, _picklable(error))
        if not writer.is_closing():
            writer.write(_frame(reply))


class LinkClient:
    """The HTTP process's end: one connection, opened on first use, shared by all requests."""

    def __init__(self, path: str):
        self.path = path
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._last_number = 0
        self._connecting: asyncio.Lock | None = None
        self._next_try = 0.0
        self._was_up = False
        self._replies: asyncio.Task | None = None  # held: the loop keeps only weak references to tasks

    async def call(self, request: dict) -> tuple[bool, Any]:
        """`(True, response)` or `(False, exception)`; raises `LinkDown` when the worker cannot
        be reached, before the request was sent (the caller may send it another way)."""
        writer = await self._connected()
        self._last_number += 1
        number = self._last_number
        future = asyncio.get_running_loop().create_future()
        self._pending[number] = future
        try:
            writer.write(_frame((number, time.monotonic(), request)))
            return await future
        finally:
            self._pending.pop(number, None)

    async def _connected(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        if time.monotonic() < self._next_try:
            raise LinkDown("the gallery worker's link is not up")
        self._connecting = self._connecting or asyncio.Lock()
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                try:
                    reader, self._writer = await asyncio.open_unix_connection(self.path)
                except OSError as error:
                    self._next_try = time.monotonic() + RETRY_CONNECT_S
                    if self._was_up:  # not a worker still starting: say so, the fallback is slower
                        logger.warning("the direct link to the gallery worker is down (%s); requests take "
                                       "LitServe's queue", error)
                    raise LinkDown(f"cannot reach the gallery worker at {self.path}: {error}") from None
                self._was_up = True
                self._replies = asyncio.ensure_future(self._read_replies(reader, self._writer))
        return self._writer

    async def _read_replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                number, ok, result = await _read_frame(reader)
                future = self._pending.get(number)
                if future is not None and not future.done():
                    future.set_result((ok, result))
        except (asyncio.IncompleteReadError, ConnectionError) as error:  # the worker stopped
            logger.log(logging.WARNING if self._pending else logging.INFO,
                       "the link to the gallery worker closed with %d requests unanswered: %r", len(self._pending), error)
        except Exception:
            logger.exception("unreadable reply on the link to the gallery worker; closing it")
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            for future in self._pending.values():  # sent, and answered by nobody now
                if not future.done():
                    future.set_exception(ConnectionError("the gallery worker closed the link"))


def socket_path(folder: str) -> str:
    return os.path.join(folder, "worker.sock")

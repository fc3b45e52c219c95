"""Micro-batching of search queries: concurrent searches share one text-encoder run.

Why: searches arrive on several worker threads at once under load. Encoded one by one, each
pays the encoder's fixed cost and they queue behind each other; encoded together, a batch of
eight costs about as much as two or three single queries (MiniLM on this CPU), so throughput
grows with concurrency instead of latency.

How: callers put (text, future) on a queue; one thread takes the first item, then everything
else already queued (up to `max_batch`), optionally after waiting `max_wait_s` for more, runs
the encoder once and hands each caller its own row. With the default `max_wait_s=0` an idle
server adds no delay: a batch forms only from queries that arrived while the encoder was busy
with the previous one, which is exactly when batching pays. An encoder error is handed to every
caller of that batch; the thread goes on with the next.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from queue import Empty, SimpleQueue
from typing import Callable

import numpy as np


def _answer(futures: list[Future], compute: Callable[[], list], what: str) -> None:
    """Give each waiting caller its own row of `compute()`; an error (or a wrong row count) goes
    to every one of them, so no caller waits for ever and the batching thread goes on."""
    try:
        results = compute()
        if len(results) != len(futures):
            raise RuntimeError(f"{len(results)} {what} for {len(futures)} calls")
        for future, result in zip(futures, results):
            future.set_result(result)
    except BaseException as error:
        for future in futures:
            if not future.done():
                future.set_exception(error)


class QueryBatcher:
    def __init__(self, embed_fn: Callable[[list[str]], np.ndarray], max_batch: int = 32, max_wait_s: float = 0.0,
                 on_start: Callable[[], None] | None = None):
        """`on_start` runs first on the batching thread (e.g. per-thread torch settings)."""
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_s >= 0")
        self._embed = embed_fn
        self._max_batch = int(max_batch)
        self._max_wait_s = float(max_wait_s)
        self._on_start = on_start
        self._queue: SimpleQueue = SimpleQueue()
        self._closed = False
        self.batches = 0  # counters for the benchmark and the tests
        self.queries = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._run, name="query-batcher", daemon=True)
        self._thread.start()

    def embed(self, text: str) -> np.ndarray:
        """The embedding of `text` (blocks until its batch has run)."""
        if self._closed:
            raise RuntimeError("the query batcher is closed")
        future: Future = Future()
        self._queue.put((text, future))
        return future.result()

    def close(self, timeout: float = 5.0) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _collect(self, first) -> tuple[list, bool]:
        """The batch starting with `first`; True when the close marker was seen."""
        batch = [first]
        deadline = time.monotonic() + self._max_wait_s
        while len(batch) < self._max_batch:
            try:
                wait = deadline - time.monotonic()
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, closing = self._collect(first)
            _answer([future for _, future in batch], lambda: self._embed([text for text, _ in batch]),
                    "vectors from the encoder")
            self.batches += 1
            self.queries += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            if closing:
                return


class GroupBatcher:
    """Micro-batching of calls that can be answered together when they share a key.

    Used for the store's top-k queries (`GalleryStore.query`): under load several searches of
    one gallery wait at once, and one Chroma query with all their embeddings costs less than
    one query each (at 100k records 4.6 instead of 5.5 ms of CPU per query in batches of 8),
    and the request threads no longer run Chroma side by side. Callers `submit(key, item)`; one thread takes the first queued call and
    every other one already queued (up to `max_batch`, no waiting: an idle server adds no
    delay), groups them by key (in arrival order) and calls `run(key, items)` once per group,
    which must return one result per item, in order. An error in one group goes to that group's
    callers only.
    """

    def __init__(self, run: Callable[[object, list], list], max_batch: int = 32, name: str = "group-batcher"):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._run_group = run
        self._max_batch = int(max_batch)
        self._queue: SimpleQueue = SimpleQueue()
        self._closed = False
        self.calls = 0  # counters for the benchmark and the tests
        self.items = 0
        self.largest_group = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, key, item):
        """`run(key, [..., item, ...])`'s result for `item` (blocks until its group has run)."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        future: Future = Future()
        self._queue.put((key, item, future))
        return future.result()

    def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        while True:  # a call that raced with close() gets an error, not a wait for ever
            try:
                item = self._queue.get_nowait()
            except Empty:
                return
            if item is not None:
                item[2].set_exception(RuntimeError("the batcher is closed"))

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, closing = [first], False
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except Empty:
                    break
                if item is None:
                    closing = True
                    break
                batch.append(item)
            groups: dict = {}
            for key, item, future in batch:
                groups.setdefault(key, []).append((item, future))
            for key, members in groups.items():
                # An error in this group goes to this group's callers only.
                _answer([future for _, future in members],
                        lambda: self._run_group(key, [item for item, _ in members]), "results")
                self.calls += 1
                self.items += len(members)
                self.largest_group = max(self.largest_group, len(members))
            if closing:
                return

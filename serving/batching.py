"""Micro-batching under load: concurrent searches share one text-encoder run and one Chroma query.

Why: searches arrive on many worker threads at once under load. Run one by one, each pays the
encoder's and the index's fixed costs and they queue behind each other; run together, eight
queries cost the text encoder ~30% less CPU each (MiniLM on this CPU) and Chroma ~15% less, so
throughput grows with concurrency instead of latency.

How: callers put (key, item, future) on a queue; one thread takes the first call, then every
other one already queued (up to `max_batch`, no waiting: an idle server adds no delay, and a
batch forms only from calls that arrived while the previous one ran, which is exactly when
batching pays), runs each key's group once and hands each caller its own result. An error goes
to the callers of that group only; the thread goes on with the next.

`max_batch` bounds the tail: a call that just missed a batch waits for it to finish, so a
batch of 32 (~110 ms of encoder time) put the p99 at 50 clients ~60 ms above a batch of 8 for
~3% more searches/s (docs/benchmarks.md).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from queue import Empty, SimpleQueue
from typing import Callable

import numpy as np


def _answer(futures: list[Future], compute: Callable[[], list]) -> None:
    """Give each waiting caller its own row of `compute()`; an error (or a wrong row count) goes
    to every one of them, so no caller waits for ever and the batching thread goes on."""
    try:
        results = compute()
        if len(results) != len(futures):
            raise RuntimeError(f"{len(results)} results for {len(futures)} calls")
        for future, result in zip(futures, results):
            future.set_result(result)
    except BaseException as error:
        for future in futures:
            if not future.done():
                future.set_exception(error)


class GroupBatcher:
    """Calls answered together when they share a key, on one thread.

    Used for the store's top-k queries (`GalleryStore.query`, key: gallery, k and folder) and,
    with a single key, for query embeddings (`QueryBatcher`). Callers `submit(key, item)`; the
    thread groups a batch by key (in arrival order) and calls `run(key, items)` once per group,
    which must return one result per item, in order. `on_start` runs first on that thread (e.g.
    per-thread torch settings).
    """

    def __init__(self, run: Callable[[object, list], list], max_batch: int = 8, name: str = "group-batcher",
                 on_start: Callable[[], None] | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._run_group = run
        self._on_start = on_start
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

    def queued(self) -> int:
        """Calls waiting for the thread (not counting the batch it is running)."""
        return self._queue.qsize()

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
        if self._on_start is not None:
            self._on_start()
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
                        lambda: self._run_group(key, [item for item, _ in members]))
                self.calls += 1
                self.items += len(members)
                self.largest_group = max(self.largest_group, len(members))
            if closing:
                return


class QueryBatcher:
    """Concurrent search queries share one text-encoder run: a `GroupBatcher` with one key."""

    def __init__(self, embed_fn: Callable[[list[str]], np.ndarray], max_batch: int = 8,
                 on_start: Callable[[], None] | None = None):
        self._embed = embed_fn
        self._batcher = GroupBatcher(self._embed_group, max_batch=max_batch, name="query-batcher", on_start=on_start)

    def _embed_group(self, _key, texts: list[str]) -> list[np.ndarray]:
        return list(self._embed(texts))

    def embed(self, text: str) -> np.ndarray:
        """The embedding of `text` (blocks until its batch has run)."""
        return self._batcher.submit(None, text)

    def queued(self) -> int:
        return self._batcher.queued()

    def close(self, timeout: float = 5.0) -> None:
        self._batcher.close(timeout)

    @property
    def batches(self) -> int:  # counters for the logs, the benchmark and the tests
        return self._batcher.calls

    @property
    def queries(self) -> int:
        return self._batcher.items

    @property
    def largest_batch(self) -> int:
        return self._batcher.largest_group

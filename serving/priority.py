"""Ingest work at a lower CPU priority than searches.

Why: on a 2-core machine an ingest (JPEG decoders plus the batched image encoder) keeps every
core busy, and searches arriving meanwhile queued behind it (p99 1.5 s, docs/benchmarks.md).
Linux keeps a nice value per thread, so the threads that only do ingest work (the decoders,
the image-encoder thread and the pool threads ONNX Runtime starts from it) step back to nice
19 and the scheduler runs search threads first; with nothing else to run, the ingest still
gets every idle cycle, so its throughput on an otherwise idle machine is unchanged.

Why 19 and not 10: a search is a pipeline of short steps on several threads and processes, and
the ingest runs in every gap between them. At nice 10 (weight 110 against 1024) the ingest
still took about half of the two cores while 50 clients searched a 100k gallery; at nice 19
(weight 15) searches/s rose from 123-127 to 136-144 and the p99 fell from 478-528 to 440-485 ms
(paired runs, docs/benchmarks.md). The price: on a machine kept busy by other programs, an
ingest waits for their idle time, as a background indexer should.

Raising one's own nice value needs no privilege; where the platform has no per-thread nice,
nothing happens.
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

BACKGROUND_NICE = 19


def lower_thread_priority(nice: int = BACKGROUND_NICE) -> None:
    """Give the calling thread (only it, and threads it starts later) nice value `nice`."""
    if not hasattr(os, "setpriority") or not os.path.isdir("/proc/self/task"):  # per-thread nice: Linux
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
    except OSError as error:
        logger.debug("could not lower the priority of thread %s: %s", threading.current_thread().name, error)

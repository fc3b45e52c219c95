"""glibc malloc settings for the server's processes, and handing freed memory back after an ingest.

Why: the gallery worker's resident memory is what a home server runs out of (issue 10's target
is 1 GB for the whole server). Most of it is the HNSW indexes, which are needed; the rest was
memory the process had freed but glibc kept:
- each thread that allocates gets its own arena (up to 8 per core), and memory freed in an
  arena is rarely returned: `MALLOC_ARENA_MAX=2`;
- glibc raises its mmap threshold to the size of the largest block freed (up to 32 MB), so
  after the first decoded 12-MP photo every later image and 32-image batch came from the heap
  and stayed there: a fixed `MALLOC_MMAP_THRESHOLD_` of 1 MB keeps such buffers in their own
  mappings, returned when freed. (256 KB saved more, ~90 MB, but cost ~3% of searches/s.)
- after an ingest, `malloc_trim` returns the free pages left inside the heap and arenas.
Measured in docs/benchmarks.md. Variables the user set are kept; elsewhere than glibc the
variables are ignored and the trim does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

logger = logging.getLogger(__name__)

MALLOC_DEFAULTS = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(4 << 20),
}


def tune_malloc() -> None:
    """Set the variables for the processes started from here (glibc reads them at start)."""
    for name, value in MALLOC_DEFAULTS.items():
        os.environ.setdefault(name, value)


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None elsewhere. Looked up once: `find_library` runs ldconfig."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError) as error:  # not glibc
        logger.debug("malloc_trim is not available: %s", error)
        return None


def release_free_memory() -> None:
    """Give the free pages of the heap and arenas back to the system (glibc `malloc_trim`)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

"""An LRU cache of query embeddings, keyed by (model id, query text).

Why: a gallery is searched with the same few words again and again (the web page searches as
the user types, pages through results, re-runs a query after an upload), and encoding a query
is the largest part of a search's CPU time. A hit costs a dictionary lookup instead.

The key holds the model id, so a vector is never reused for another model (a server restarted
with another checkpoint, or two embedders sharing one cache). Cached vectors are returned
read-only: a caller that normalised one in place would corrupt every later hit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np


class QueryCache:
    def __init__(self, max_entries: int = 4096):
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = int(max_entries)
        self._entries: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # searches run on several worker threads
        self.hits = 0
        self.misses = 0

    def get(self, model_id: str, text: str) -> np.ndarray | None:
        key = (model_id, text)
        with self._lock:
            vector = self._entries.get(key)
            if vector is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return vector

    def put(self, model_id: str, text: str, vector: np.ndarray) -> np.ndarray:
        vector = np.array(vector, dtype=np.float32, copy=True)
        vector.flags.writeable = False
        if self.max_entries == 0:
            return vector
        with self._lock:
            self._entries[(model_id, text)] = vector
            self._entries.move_to_end((model_id, text))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return vector

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        return {"entries": len(self), "max_entries": self.max_entries, "hits": self.hits, "misses": self.misses}

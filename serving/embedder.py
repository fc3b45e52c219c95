"""The model side of serving: a loaded checkpoint that turns images and queries into vectors.

Concurrent search requests run on several threads; their queries are gathered into one
text-encoder batch (`QueryBatcher`) instead of each thread running the encoder on its own and
fighting over the same cores.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from queue import Empty, SimpleQueue

import numpy as np
import torch

logger = logging.getLogger(__name__)


class Embedder:
    def __init__(self, checkpoint: str, device: str = "auto", bf16: str | bool = "auto", threads: int | None = None):
        from training.checkpoint import load_checkpoint

        if threads:
            torch.set_num_threads(int(threads))
        self.checkpoint = load_checkpoint(checkpoint, device=device, bf16=bf16)
        self.model_id = self.checkpoint.model_id
        self.preprocessing = self.checkpoint.preprocessing
        self.transform = self.checkpoint.image_transform
        self.dim = int(self.embed_texts(["dimension probe"]).shape[1])
        self._batcher = QueryBatcher(self.embed_texts)

    def embed_images(self, pixels: list[torch.Tensor] | torch.Tensor) -> np.ndarray:
        if isinstance(pixels, list):
            pixels = torch.stack(pixels)
        return self.checkpoint.embed_images(pixels).numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.checkpoint.embed_texts(list(texts)).numpy()

    def embed_query(self, text: str) -> np.ndarray:
        return self._batcher.embed(text)

    def close(self) -> None:
        self._batcher.close()


class QueryBatcher:
    """Coalesces queries that arrive while the encoder is busy into one batch."""

    def __init__(self, embed_fn, max_batch: int = 32):
        self._embed = embed_fn
        self._max_batch = max_batch
        self._queue: SimpleQueue = SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="query-batcher", daemon=True)
        self._thread.start()

    def embed(self, text: str) -> np.ndarray:
        future: Future = Future()
        self._queue.put((text, future))
        return future.result()

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            try:
                vectors = self._embed([text for text, _ in batch])
                for (_, future), vector in zip(batch, vectors):
                    future.set_result(vector)
            except BaseException as error:  # hand the error to every waiting request
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)

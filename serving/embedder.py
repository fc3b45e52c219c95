"""The model side of serving: a loaded checkpoint that turns images and queries into vectors.

Two backends with one interface (`embed_images`, `embed_texts`, `transform`, `preprocessing`):
- ONNX Runtime (`serving.onnx_encoder`), the default on CPU: faster on a small CPU, and the
  gallery worker then never imports torch, which halves its memory (docs/benchmarks.md). The
  graphs are exported once per model by a child process and verified against eager fp32
  (cosine >= 0.999) before they are used.
- eager PyTorch (`training.checkpoint`): on CUDA, when bf16 is asked for, when
  `SMART_GALLERY_ENCODER=torch`, or when the export fails (logged, never silent).
`SMART_GALLERY_ENCODER=onnx` makes an export failure an error instead of a fallback.

Search queries go through an LRU cache keyed by (model id, text) (`serving.query_cache`), then
a micro-batcher (`serving.batching`): concurrent searches share one text-encoder run instead of
each thread running the encoder on its own and fighting over the same cores. The batcher's
thread runs the text encoder (ONNX Runtime on `text_threads` threads, eager PyTorch on one;
why: `serving.onnx_encoder`). The store's top-k queries are batched the same way, per gallery
(`GalleryStore.query`).

Image batches (ingest) run on a thread of their own at a lower CPU priority
(`serving.priority`), so searches arriving during an ingest get the cores first; a single
picture (search by image) runs on the caller's thread at normal priority.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from serving.batching import QueryBatcher
from serving.priority import lower_thread_priority
from serving.query_cache import QueryCache

logger = logging.getLogger(__name__)

ENCODERS = ("auto", "onnx", "torch")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class TorchEncoders:
    """Eager PyTorch: the checkpoint as `training.checkpoint.load_checkpoint` loads it."""

    backend = "torch"

    def __init__(self, checkpoint: str, device: str = "auto", bf16: str | bool = "auto", threads: int | None = None):
        import torch

        from training.checkpoint import load_checkpoint

        if threads:
            torch.set_num_threads(int(threads))
        self.checkpoint = load_checkpoint(checkpoint, device=device, bf16=bf16)
        self.model_id = self.checkpoint.model_id
        self.preprocessing = self.checkpoint.preprocessing
        self.transform = self.checkpoint.image_transform
        self.dim = int(self.embed_texts(["dimension probe"]).shape[1])

    def embed_images(self, pixels) -> np.ndarray:
        import torch

        if isinstance(pixels, (list, tuple)):
            pixels = torch.stack([torch.as_tensor(p) for p in pixels])
        return self.checkpoint.embed_images(torch.as_tensor(pixels)).numpy()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.checkpoint.embed_texts(list(texts)).numpy()

    @staticmethod
    def query_thread_setup() -> None:
        import torch

        torch.set_num_threads(1)  # per thread: the ingest threads keep every core


def _choose(encoder: str, device: str, bf16) -> str:
    if encoder not in ENCODERS:
        raise ValueError(f"SMART_GALLERY_ENCODER must be one of {', '.join(ENCODERS)}, got {encoder!r}")
    if encoder != "auto":
        return encoder
    if str(device).startswith("cuda") or bf16 is True or str(bf16).lower() == "true":
        return "torch"
    if device == "auto" and os.path.exists("/proc/driver/nvidia/version"):
        return "torch"  # a GPU may be there: let torch decide
    return "onnx"


class Embedder:
    def __init__(self, checkpoint: str, device: str = "auto", bf16: str | bool = "auto", threads: int | None = None,
                 encoder: str | None = None, query_cache_size: int = 4096, max_batch: int = 8, text_threads: int = 2):
        threads = int(threads or _cores())
        text_threads = min(int(text_threads), threads)
        # The encoders are built on the low-priority image thread: the pool threads ONNX Runtime
        # starts for the image session inherit its priority. So does the text session's second
        # thread, on purpose: when the cores are free it halves a query's wall time, under load
        # it steps back and the query's own thread does the work. Built at normal priority, it
        # measured no better in three paired runs of 50 clients during an ingest (120-132 vs
        # 134-152 searches/s, docs/benchmarks.md).
        self._image_thread = ThreadPoolExecutor(1, thread_name_prefix="image-encoder", initializer=lower_thread_priority)
        try:
            self.encoders = self._image_thread.submit(self._load, checkpoint, device, bf16, threads, encoder,
                                                      text_threads).result()
        except BaseException:
            self._image_thread.shutdown(wait=False)
            raise
        self.backend = self.encoders.backend
        self.model_id = self.encoders.model_id
        self.preprocessing = self.encoders.preprocessing
        self.transform = self.encoders.transform
        self.dim = self.encoders.dim
        self.query_cache = QueryCache(query_cache_size)
        self._batcher = QueryBatcher(self.encoders.embed_texts, max_batch=max_batch,
                                     on_start=getattr(self.encoders, "query_thread_setup", None))
        logger.info("encoders: %s (model %s, %d threads for images, %d for queries)", self.backend, self.model_id,
                    threads, text_threads if self.backend == "onnxruntime" else 1)

    @staticmethod
    def _load(checkpoint: str, device: str, bf16, threads: int, encoder: str | None, text_threads: int):
        choice = _choose(encoder or os.environ.get("SMART_GALLERY_ENCODER", "auto"), device, bf16)
        encoders = None
        if choice == "onnx":
            from serving.onnx_encoder import OnnxEncoders, OnnxExportError
            from serving.onnx_export import ensure_export

            try:
                encoders = OnnxEncoders(ensure_export(checkpoint), checkpoint, image_threads=threads,
                                        text_threads=text_threads)
            except OnnxExportError as error:
                if encoder == "onnx" or os.environ.get("SMART_GALLERY_ENCODER") == "onnx":
                    raise
                logger.warning("%s; serving with eager PyTorch instead", error)
        return encoders or TorchEncoders(checkpoint, device, bf16, threads)

    def embed_images(self, pixels) -> np.ndarray:
        """A batch (ingest) runs on the low-priority image thread; one picture (a query) right here."""
        if len(pixels) <= 1:
            return self.encoders.embed_images(pixels)
        return self._image_thread.submit(self.encoders.embed_images, pixels).result()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.encoders.embed_texts(list(texts))

    def embed_query(self, text: str) -> np.ndarray:
        """One search query's embedding (read-only): from the cache, else batched with concurrent ones."""
        vector = self.query_cache.get(self.model_id, text)
        if vector is None:
            vector = self.query_cache.put(self.model_id, text, self._batcher.embed(text))
        return vector

    def stats(self) -> dict:
        return {"backend": self.backend, "query_cache": self.query_cache.stats(),
                "batches": self._batcher.batches, "batched_queries": self._batcher.queries,
                "largest_batch": self._batcher.largest_batch}

    def close(self) -> None:
        logger.info("embedder stats: %s", self.stats())
        self._batcher.close()
        self._image_thread.shutdown(wait=False)

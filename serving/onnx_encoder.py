"""The checkpoint's two encoders in ONNX Runtime: the CPU fast path of the gallery worker.

Why ONNX Runtime: on the 2-core AVX2 machine without AMX (docs/benchmarks.md) it ran the
EfficientNet-Lite0 image encoder ~2.5x faster than eager PyTorch fp32 channels_last and one
MiniLM query ~2x faster, with embeddings equal to eager fp32 at cosine > 0.9999; and the worker
then never imports torch (~550 MB of RSS for the CUDA build) or timm. It is already installed
as a ChromaDB dependency.

The graphs are exported from the checkpoint by `serving.onnx_export` (in a separate process,
which alone imports torch) into a cache folder, and verified there against eager fp32 on a
fixed probe set; `load` refuses a folder whose manifest does not show that check passed.

Thread settings, for a small shared CPU:
- the image session uses every core (ingest is throughput work);
- the text session uses `search.text_threads` (2): a sequential search at 100k images took
  p50 13.7-13.9 ms with two against 15.5-15.6 ms with one, and with two busy programs beside
  it 14.3-15.6 against 19-35 ms; under 50 concurrent clients the second thread cost ~0.7 ms of
  CPU per search (docs/benchmarks.md). (Eager PyTorch was the opposite: its second thread's
  barrier waited for the busy other core, p50 30-50 ms, so the torch path keeps one.)
- no spin-waiting (`allow_spinning=0`): spinning threads burn the core the HTTP process and
  the decoders need.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from serving.preprocess import ImageTransform, QueryTokenizer, ServingPreprocessing

logger = logging.getLogger(__name__)

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
MANIFEST_FILE = "manifest.json"
MIN_COSINE = 0.999  # the embeddings must match eager fp32 at least this closely on the probe set


class OnnxExportError(RuntimeError):
    """No usable ONNX export of a checkpoint (missing, failed, or not matching eager fp32)."""


def _session(path: Path, threads: int, arena: bool, prepack: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Without the arena, activations go back to the allocator after each run instead of staying
    # reserved at their peak size (a 32-image batch's peak is hundreds of MB).
    options.enable_cpu_mem_arena = arena
    # Pre-packed weights are a second, re-laid-out copy. MiniLM needs them (one query: 4.7 ms
    # with, 8.2 ms without); the image encoder ran at the same speed without (109 vs 108 img/s)
    # and its session took ~30 MB less.
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEncoders:
    """`embed_images` / `embed_texts` with the checkpoint's preprocessing, no torch needed."""

    backend = "onnxruntime"

    def __init__(self, export_dir: str | Path, checkpoint_dir: str | Path, image_threads: int = 1,
                 text_threads: int = 1, checked: bool = True):
        """`checked=False` only for the export's own verification, before the manifest says it passed."""
        export_dir, checkpoint_dir = Path(export_dir), Path(checkpoint_dir)
        manifest = read_manifest(export_dir) if checked else json.loads((export_dir / MANIFEST_FILE).read_text())
        config = json.loads((checkpoint_dir / "config.json").read_text())
        if manifest.get("model_id") != config["model_id"]:
            raise OnnxExportError(f"{export_dir} was exported from model {manifest.get('model_id')}, "
                                  f"not {config['model_id']}")
        self.model_id = config["model_id"]
        self.export_dir = export_dir
        self.preprocessing = ServingPreprocessing.from_dict(config["preprocessing"])
        self.transform = ImageTransform(self.preprocessing)
        self.tokenize = QueryTokenizer(checkpoint_dir / "tokenizer", self.preprocessing.max_tokens)
        self.image_session = _session(export_dir / IMAGE_FILE, image_threads, arena=False, prepack=False)
        self.text_session = _session(export_dir / TEXT_FILE, text_threads, arena=True)
        self.dim = int(manifest["embed_dim"])

    def embed_images(self, pixels) -> np.ndarray:
        """[B,3,S,S] pixels (or a list of [3,S,S]) -> [B,D] float32 unit vectors."""
        if isinstance(pixels, (list, tuple)):
            pixels = np.stack([np.asarray(p, dtype=np.float32) for p in pixels])
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        return self.image_session.run(None, {"pixels": pixels})[0]

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenize(list(texts))
        return self.text_session.run(None, batch)[0]


def read_manifest(export_dir: Path) -> dict:
    file = Path(export_dir) / MANIFEST_FILE
    if not file.is_file() or not (export_dir / IMAGE_FILE).is_file() or not (export_dir / TEXT_FILE).is_file():
        raise OnnxExportError(f"no complete ONNX export in {export_dir}")
    manifest = json.loads(file.read_text())
    worst = min(manifest.get("min_cosine_image", 0.0), manifest.get("min_cosine_text", 0.0))
    if worst < MIN_COSINE:
        raise OnnxExportError(f"the ONNX export in {export_dir} matches eager fp32 only to cosine {worst:.6f} "
                              f"(needs >= {MIN_COSINE})")
    return manifest

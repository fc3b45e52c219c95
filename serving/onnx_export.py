"""Export a checkpoint's encoders to ONNX, verified against eager fp32, into a cache folder.

    python -m serving.onnx_export CHECKPOINT_DIR [--out DIR] [--force]

The gallery worker runs its encoders in ONNX Runtime (`serving.onnx_encoder`) and never
imports torch; this module is the only serving code that does, and the worker runs it as a
separate, short-lived process (`ensure_export`) the first time it serves a checkpoint, so
torch's memory is returned when it exits.

What is exported: the whole embedding path of each side (image: backbone, pooling, projection
head, zero-shot readout, normalisation; text: MiniLM/BERT, pooling, head, readout), fp32, with
a dynamic batch (and token) dimension. Verification runs the exported graphs through the
serving preprocessing (`serving.preprocess`: its own image transform and tokenizer) and the
checkpoint through eager PyTorch with the training preprocessing, on a fixed probe set (16
texts of different lengths, one truncated; 8 pictures of different shapes; batches of one and
of all), and records the lowest cosine of each side in `manifest.json`. Below 0.999 the export
is refused and the server stays on eager PyTorch.

The cache folder is `$SMART_GALLERY_CACHE/onnx/<model id>-v<format>` (default
`~/.cache/smart-gallery`): the model id is a hash of the weights, so a folder is never stale,
and checkpoints themselves are only read. Exports are written to a temporary folder and renamed
into place, so two servers starting at once cannot leave a half-written export. The cache keeps
the 8 most recently used exports (`prune_exports`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from serving.onnx_encoder import IMAGE_FILE, MANIFEST_FILE, MIN_COSINE, TEXT_FILE, OnnxEncoders, OnnxExportError, read_manifest

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 1  # bump when the exported graphs change meaning
OPSET = 17
KEEP_EXPORTS = 8  # most recently used exports kept in the cache folder
PROBE_TEXTS = [
    "a dog", "beach", "a photo of a mountain lake at sunset", "Red CAR parked on the street!",
    "two people walking on the beach with a dog, the sun going down behind them over the sea and some boats "
    "far out on the water near a lighthouse on a rocky island with birds flying above it",  # > 32 tokens
    "birthday cake with candles", "an icon of a house", "café in Paris", "x", "a black and white drawing of a cat",
    "city street at night in the rain", "forest", "a hand-drawn star", "flowers in a vase on a table",
    "snow-covered mountains", "a map of the world",
]
PROBE_SIZES = [(320, 240), (240, 320), (224, 224), (640, 200), (150, 150), (500, 375), (64, 48), (1000, 750)]


def cache_root() -> Path:
    configured = os.environ.get("SMART_GALLERY_CACHE")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "smart-gallery"


def export_dir_for(checkpoint: str | Path) -> Path:
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    return cache_root() / "onnx" / f"{config['model_id']}-v{EXPORT_FORMAT}"


def probe_images():
    """Fixed pictures: smooth colour fields with grain, in several shapes (deterministic)."""
    from PIL import Image

    images = []
    for seed, (width, height) in enumerate(PROBE_SIZES):
        rng = np.random.default_rng(1000 + seed)
        coarse = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
        grain = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
        images.append(Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)))
    return images


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def compare_with_eager(loaded, encoders) -> dict:
    """Lowest cosine between eager fp32 (training preprocessing) and `encoders` (serving's)."""
    import torch

    from data.transforms import eval_transform

    images = probe_images()
    torch_transform = eval_transform(loaded.preprocessing)
    eager_images = loaded.embed_images(torch.stack([torch_transform(i) for i in images])).numpy()
    pixels = [encoders.transform(i) for i in images]
    served_images = np.concatenate([encoders.embed_images(pixels), *[encoders.embed_images([p]) for p in pixels]])
    eager_texts = loaded.embed_texts(PROBE_TEXTS).numpy()
    served_texts = np.concatenate([encoders.embed_texts(PROBE_TEXTS), *[encoders.embed_texts([t]) for t in PROBE_TEXTS]])
    n_img, n_txt = len(images), len(PROBE_TEXTS)
    return {
        "min_cosine_image": float(cosines(np.tile(eager_images, (2, 1)), served_images).min()),
        "min_cosine_text": float(cosines(np.tile(eager_texts, (2, 1)), served_texts).min()),
        "probe": {"images": n_img, "texts": n_txt, "batches": "all at once and one by one"},
    }


def _wrappers(model):
    """Graph modules for the two sides (built here so that importing this module needs no torch)."""
    import torch

    class ImageGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixels):
            return self.model.encode_image(pixels)

    class TextGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model.encode_text(input_ids, attention_mask)

    return ImageGraph().eval(), TextGraph().eval()


def export(checkpoint: str | Path, out_dir: str | Path, threads: int | None = None) -> dict:
    """Export, verify, and move into `out_dir` (which must not exist yet). Returns the manifest."""
    import torch

    from training.checkpoint import load_checkpoint

    checkpoint, out_dir = Path(checkpoint).expanduser().resolve(), Path(out_dir)
    if threads:
        torch.set_num_threads(int(threads))
    started = time.perf_counter()
    loaded = load_checkpoint(checkpoint, device="cpu", bf16=False)  # the reference: eager fp32
    size = loaded.preprocessing.image_size
    image_graph, text_graph = _wrappers(loaded.model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        # Traced with a padded batch of two: a mask of all ones could let the text model skip
        # the mask in the traced graph, which would then be wrong for padded batches.
        sample = loaded.tokenize(["a photo of a dog on the beach", "beach"])
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(image_graph, (torch.zeros(2, 3, size, size),), str(work / IMAGE_FILE), dynamo=False,
                              opset_version=OPSET, input_names=["pixels"], output_names=["embedding"],
                              dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}})
            torch.onnx.export(text_graph, (sample["input_ids"], sample["attention_mask"]), str(work / TEXT_FILE),
                              dynamo=False, opset_version=OPSET, input_names=["input_ids", "attention_mask"],
                              output_names=["embedding"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                            "attention_mask": {0: "batch", 1: "tokens"}, "embedding": {0: "batch"}})
        manifest = {"format": EXPORT_FORMAT, "model_id": loaded.model_id, "checkpoint": str(checkpoint),
                    "embed_dim": int(loaded.model.embed_dim), "opset": OPSET, "torch": torch.__version__,
                    "min_cosine_image": 0.0, "min_cosine_text": 0.0}
        (work / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        import onnxruntime

        encoders = OnnxEncoders(work, checkpoint, checked=False)  # this comparison IS the check
        manifest.update(compare_with_eager(loaded, encoders), onnxruntime=onnxruntime.__version__,
                        export_seconds=round(time.perf_counter() - started, 1))
        (work / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        worst = min(manifest["min_cosine_image"], manifest["min_cosine_text"])
        if worst < MIN_COSINE:
            raise OnnxExportError(f"ONNX export of {checkpoint} matches eager fp32 only to cosine {worst:.6f} "
                                  f"(image {manifest['min_cosine_image']:.6f}, text {manifest['min_cosine_text']:.6f})")
        try:
            os.rename(work, out_dir)
        except OSError:  # another process finished the same export first: keep theirs
            if not (out_dir / MANIFEST_FILE).is_file():
                raise
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_export(checkpoint: str | Path, timeout_s: float = 600.0) -> Path:
    """The verified export folder of `checkpoint`, exporting it first in a child process if needed."""
    checkpoint = Path(checkpoint).expanduser().resolve()
    out_dir = export_dir_for(checkpoint)
    try:
        read_manifest(out_dir)
        _mark_used(out_dir)
        return out_dir
    except OnnxExportError:
        pass
    logger.info("exporting %s to ONNX in %s (once per model; eager PyTorch checks it)", checkpoint, out_dir)
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run([sys.executable, "-m", "serving.onnx_export", str(checkpoint), "--out", str(out_dir)],
                              capture_output=True, text=True, timeout=timeout_s, env=env, cwd=repo)
    except subprocess.TimeoutExpired:
        raise OnnxExportError(f"exporting {checkpoint} to ONNX took over {timeout_s:.0f} s") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise OnnxExportError(f"exporting {checkpoint} to ONNX failed: {' | '.join(tail)}")
    read_manifest(out_dir)
    _mark_used(out_dir)
    prune_exports(keep=KEEP_EXPORTS)
    return out_dir


def _mark_used(out_dir: Path) -> None:
    try:
        os.utime(out_dir / MANIFEST_FILE)
    except OSError:  # a read-only cache still serves
        pass


def prune_exports(keep: int = KEEP_EXPORTS) -> list[Path]:
    """Remove all but the `keep` most recently used exports (each is 20-500 MB; every model a
    server or a test run ever served would otherwise stay). A server already running keeps its
    sessions in memory, and a removed export is made again the next time it is needed."""
    folders = [d for d in (cache_root() / "onnx").glob(f"*-v{EXPORT_FORMAT}") if (d / MANIFEST_FILE).is_file()]
    folders.sort(key=lambda d: (d / MANIFEST_FILE).stat().st_mtime, reverse=True)
    removed = folders[keep:]
    for folder in removed:
        logger.info("removing the least recently used ONNX export %s", folder)
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, help="export folder (default: the cache folder of this model)")
    parser.add_argument("--force", action="store_true", help="export again even if a verified export exists")
    args = parser.parse_args(argv)
    out_dir = args.out or export_dir_for(args.checkpoint)
    if args.force and out_dir.exists():
        shutil.rmtree(out_dir)
    if (out_dir / MANIFEST_FILE).is_file():
        print(f"{out_dir}: already exported")
        return 0
    try:
        manifest = export(args.checkpoint, out_dir)
    except OnnxExportError as error:
        print(f"onnx_export: {error}", file=sys.stderr)
        return 1
    print(f"{out_dir}: cosine to eager fp32 >= {manifest['min_cosine_image']:.6f} (image), "
          f"{manifest['min_cosine_text']:.6f} (text); {manifest['export_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Torch-free image and text preprocessing for serving, identical to training's.

Why: importing torch (a CUDA build here) costs the gallery worker ~550 MB RSS before any model
is loaded, and timm another ~180 MB. With the encoders running in ONNX Runtime
(`serving.onnx_encoder`), these two functions are all that was still needed from torch and
torchvision, so the worker can run without importing them at all.

- `ImageTransform` does what `data.transforms.eval_transform` does on a PIL image (the same PIL
  resize call torchvision makes for PIL input, the same centre-crop rounding, the same float32
  arithmetic for ToTensor and Normalize), giving a float32 CHW array.
- `QueryTokenizer` is the checkpoint's `tokenizer.json` in the `tokenizers` library, padded to
  the longest text and truncated at `max_tokens` like `data.transforms.tokenize`.

Both are checked against the torch versions in tests/test_serving_fast_path.py, and end to end
(embeddings within cosine 0.999) whenever a checkpoint is exported (`serving.onnx_export`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ServingPreprocessing:
    """The checkpoint's `preprocessing` section (what `data.transforms.Preprocessing` holds)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_tokens: int
    resize: str = "crop"

    @classmethod
    def from_dict(cls, values: dict) -> "ServingPreprocessing":
        return cls(int(values["image_size"]), tuple(float(v) for v in values["mean"]),
                   tuple(float(v) for v in values["std"]), int(values["max_tokens"]),
                   str(values.get("resize", "crop")))


class ImageTransform:
    """PIL image -> normalised float32 [3, S, S] array, as `eval_transform` computes it."""

    def __init__(self, pre: ServingPreprocessing):
        if pre.resize not in ("crop", "squash"):
            raise ValueError(f"model.image.resize must be crop or squash, got {pre.resize!r}")
        self.size = pre.image_size
        self.resize = pre.resize
        self.mean = np.asarray(pre.mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(pre.std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, image: Image.Image) -> np.ndarray:
        size = self.size
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        if self.resize == "squash":
            target = (size, size)
        else:  # torchvision: the short side to `size`, the long side int(size * long / short)
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(size * long / short)
            target = (size, new_long) if width <= height else (new_long, size)
        if target != (width, height):
            image = image.resize(target, Image.BICUBIC)  # PIL antialiases bicubic, as torchvision relies on
        if self.resize == "crop":
            width, height = image.size
            top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
            image = image.crop((left, top, left + size, top + size))
        pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        return (pixels - self.mean) / self.std


class QueryTokenizer:
    """The checkpoint's fast tokenizer without transformers: ids and mask as int64 arrays."""

    def __init__(self, tokenizer_dir: str | Path, max_tokens: int):
        from tokenizers import Tokenizer

        tokenizer_dir = Path(tokenizer_dir)
        self.tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        config_file = tokenizer_dir / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        pad_token = config.get("pad_token") or "[PAD]"
        pad_id = self.tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"{tokenizer_dir}: the tokenizer has no pad token {pad_token!r}")
        self.tokenizer.enable_truncation(max_length=int(max_tokens))
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)  # to the longest in the batch

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts))
        return {"input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64)}

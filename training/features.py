"""Running the frozen prefixes of both encoders once, so training can reuse their output.

With most of each backbone frozen, almost all of a training step's compute is the frozen
prefix. Caching its output (one eval-transformed view per image, every caption phrasing)
turns an epoch into a few hundred milliseconds of head/suffix training on CPU. The price is
no image augmentation, which `trainer.cache_features=false` keeps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data.dataset import FailureLog, readable_image_batches
from data.transforms import eval_transform, tokenize, train_transform

log = logging.getLogger(__name__)


def autocast_for(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@dataclass
class TextPrefixes:
    """Prefix outputs for a list of texts: pooled [M, H], or hidden [M, T, H] with mask [M, T]."""

    values: torch.Tensor
    mask: torch.Tensor | None

    def select(self, rows: torch.Tensor, device: torch.device):
        if self.mask is None:
            return self.values[rows].to(device, torch.float32)
        mask = self.mask[rows]
        length = int(mask.sum(1).max())  # trim padding shared by the whole batch
        return self.values[rows, :length].to(device, torch.float32), mask[:, :length].to(device)


@torch.no_grad()
def image_prefixes(model, paths: list[str], preprocessing, device, use_bf16: bool, batch_size: int,
                   num_workers: int, failures: FailureLog, desc: str = "image features",
                   views: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (prefixes [N, ...], ok [N] bool); unreadable images get ok=False and are logged.

    With `views` > 1 each image is decoded once and yields the eval view plus `views - 1`
    augmented views (random resized crop, flip): prefixes are then [N, views, ...].
    """
    transform = eval_transform(preprocessing) if views == 1 else MultiView(preprocessing, views)
    ok = torch.zeros(len(paths), dtype=torch.bool)
    out = None
    model.eval()
    for indices, pixels in readable_image_batches(paths, transform, preprocessing.image_size, batch_size,
                                                  num_workers, failures, desc):
        pixels = pixels.flatten(0, 1) if views > 1 else pixels
        with autocast_for(device, use_bf16):
            features = model.image_encoder.forward_prefix(pixels.to(device, memory_format=torch.channels_last))
        features = _storage(features)
        if views > 1:
            features = features.unflatten(0, (-1, views))
        if out is None:
            out = torch.zeros((len(paths), *features.shape[1:]), dtype=features.dtype)
        out[indices] = features.cpu()
        ok[indices] = True
    if out is None:
        raise RuntimeError(f"none of the {len(paths)} images could be read")
    return out, ok


class MultiView:
    """The eval view followed by augmented training views of one decoded image."""

    def __init__(self, preprocessing, views: int):
        self.eval_view, self.train_view, self.views = eval_transform(preprocessing), train_transform(preprocessing), views

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([self.eval_view(image)] + [self.train_view(image) for _ in range(self.views - 1)])


@torch.no_grad()
def text_prefixes(model, tokenizer, texts: list[str], max_tokens: int, device, use_bf16: bool,
                  batch_size: int = 256, desc: str = "text features") -> TextPrefixes:
    model.eval()
    pooled = model.text_encoder.fully_frozen
    # Pooled vectors need no common length: batch texts of similar length together (most
    # captions are a few tokens; padding each batch to 32 made the pass ~4x slower).
    order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if pooled else list(range(len(texts)))
    values, masks = [], []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", dynamic_ncols=True):
        batch = tokenize(tokenizer, [texts[i] for i in order[start : start + batch_size]], max_tokens)
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        if not pooled:
            # Pad every batch to max_tokens so the hidden states of all batches stack into one tensor.
            pad = max_tokens - ids.shape[1]
            ids = torch.nn.functional.pad(ids, (0, pad), value=tokenizer.pad_token_id or 0)
            mask = torch.nn.functional.pad(mask, (0, pad), value=0)
        with autocast_for(device, use_bf16):
            prefix = model.text_encoder.forward_prefix(ids, mask)
        if isinstance(prefix, tuple):
            values.append(_storage(prefix[0]).cpu())
            masks.append(prefix[1].cpu())
        else:
            values.append(_storage(prefix).cpu())
    if not pooled:
        return TextPrefixes(torch.cat(values), torch.cat(masks))
    stacked = torch.cat(values)
    return TextPrefixes(torch.empty_like(stacked).index_copy_(0, torch.tensor(order), stacked), None)


def _storage(features: torch.Tensor) -> torch.Tensor:
    """Pooled vectors stay float32; spatial maps / token states go to bf16 to halve memory."""
    return features.float() if features.dim() == 2 else features.to(torch.bfloat16)


def _size_mtime(path: str) -> tuple[int, int]:
    try:
        stat = Path(path).stat()
        return stat.st_size, stat.st_mtime_ns
    except OSError:
        return -1, -1


class DiskCache:
    """Prefix tensors on disk (image, or pooled text), keyed by everything that determines them."""

    def __init__(self, directory: str | None):
        self.directory = Path(directory).expanduser() if directory else None

    @staticmethod
    def key(image_encoder, preprocessing, paths: list[str], views: int = 1) -> str:
        """The frozen stages' weights, the preprocessing and the file list (with sizes/mtimes)."""
        from training.checkpoint import model_id_of

        frozen = image_encoder.stages[: image_encoder.num_frozen]
        stats = [(p, *_size_mtime(p)) for p in paths]
        shape = [len(frozen), image_encoder.pooled_stages, image_encoder.out_dim]  # what the prefix returns
        payload = json.dumps([model_id_of(frozen.state_dict()), shape, preprocessing.to_dict(), stats, views])
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    @staticmethod
    def text_key(text_encoder, max_tokens: int, texts: list[str]) -> str:
        """A fully frozen text encoder's weights, pooling, token limit and the texts themselves."""
        from training.checkpoint import model_id_of

        payload = json.dumps([model_id_of(text_encoder.state_dict()), text_encoder.pooling, max_tokens, texts])
        return "text-" + hashlib.sha256(payload.encode()).hexdigest()[:20]

    def load(self, key: str):
        if self.directory is None or not (self.directory / f"{key}.safetensors").exists():
            return None
        tensors = load_file(str(self.directory / f"{key}.safetensors"))
        log.info("loaded cached features %s", key)
        return tensors["prefixes"], tensors["ok"].bool()

    def save(self, key: str, prefixes: torch.Tensor, ok: torch.Tensor) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f"{key}.{os.getpid()}.tmp"  # torchrun ranks may save the same key at once
        save_file({"prefixes": prefixes.contiguous(), "ok": ok.to(torch.uint8)}, str(tmp))
        tmp.rename(self.directory / f"{key}.safetensors")

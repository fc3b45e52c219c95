"""Torch datasets over `Sample` lists. Unreadable images are skipped and reported, not fatal."""

from __future__ import annotations

import logging
import math
import random

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.images import ImageLoadError, load_image
from data.records import Sample

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Item i -> (i, pixels) or (i, None, reason) when the image cannot be used."""

    def __init__(self, paths: list[str], transform, min_size: int):
        self.paths = paths
        self.transform = transform
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(load_image(self.paths[index], min_size=self.min_size)), None
        except ImageLoadError as error:
            return index, None, str(error)


class ImageCaptionDataset(ImageDataset):
    """Item i -> (i, pixels, caption); the caption is drawn from the sample's captions
    (and its augmentation phrasings when `caption_augmentation` is on)."""

    def __init__(self, samples: list[Sample], transform, min_size: int, caption_augmentation: bool = False):
        super().__init__([s.image_path for s in samples], transform, min_size)
        self.samples = samples
        self.caption_augmentation = caption_augmentation

    def __getitem__(self, index: int):
        index, pixels, error = super().__getitem__(index)
        return index, pixels, error, pick_caption(self.samples[index], self.caption_augmentation, random)


def pick_caption(sample: Sample, augment: bool, rng) -> str:
    choices = sample.captions + (sample.aug_captions if augment else ())
    return choices[rng.randrange(len(choices))]


def collate_skipping_failures(items):
    """Stack the good items; keep (index, reason) of the bad ones so the caller can count them."""
    good = [item for item in items if item[1] is not None]
    failed = [(item[0], item[2]) for item in items if item[1] is None]
    batch = {
        "index": torch.tensor([item[0] for item in good], dtype=torch.long),
        "pixels": torch.stack([item[1] for item in good]) if good else None,
        "failed": failed,
    }
    if good and len(good[0]) > 3:
        batch["captions"] = [item[3] for item in good]
    return batch


class FailureLog:
    """Collects skipped images once each, for the count and the logged list."""

    def __init__(self):
        self.reasons: dict[str, str] = {}

    def add(self, path: str, reason: str) -> None:
        if path not in self.reasons:
            log.warning("skipping unreadable image: %s", reason)
            self.reasons[path] = reason

    def __len__(self) -> int:
        return len(self.reasons)


def readable_image_batches(paths: list[str], transform, min_size: int, batch_size: int, num_workers: int,
                           failures: FailureLog, desc: str | None = None):
    """Yield (indices into `paths`, pixels) for the readable images, in order, decoded in
    `num_workers` processes; unreadable ones go to `failures`. `desc` shows a progress bar."""
    loader = DataLoader(ImageDataset(paths, transform, min_size), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_skipping_failures)
    batches = tqdm(loader, desc=desc, unit="batch", total=math.ceil(len(paths) / batch_size),
                   disable=desc is None, dynamic_ncols=True)
    for batch in batches:
        for index, reason in batch["failed"]:
            failures.add(paths[index], reason)
        if batch["pixels"] is not None:
            yield batch["index"], batch["pixels"]

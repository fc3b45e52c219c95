"""The one in-memory shape every dataset reader produces, and the deterministic split."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One image and the texts that describe it.

    `captions` are the reference captions (used for evaluation and training);
    `aug_captions` are extra phrasings used only as training-time caption augmentation.
    `group` is an optional category (e.g. a folder name) for category-level metrics.
    """

    image_id: str
    image_path: str
    captions: tuple[str, ...]
    group: str | None = None
    aug_captions: tuple[str, ...] = field(default_factory=tuple)
    source: str | None = None  # the dataset a mixture read it from (data.mixture)
    # What the split hashes instead of image_id when set: several images of one thing (an
    # icon in several weights) share it, so they always land in the same split.
    split_key: str | None = None


def split_of(image_id: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """Deterministic split by a hash of the image id, so splits never mix between runs."""
    digest = hashlib.sha1(image_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    train, val, _ = fractions
    if u < train:
        return "train"
    if u < train + val:
        return "val"
    return "test"


def select_split(samples: list[Sample], split: str, fractions=(0.8, 0.1, 0.1)) -> list[Sample]:
    """Samples of one split; `split="all"` keeps every sample."""
    if split == "all":
        return list(samples)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS} or 'all'")
    return [s for s in samples if split_of(s.split_key or s.image_id, tuple(fractions)) == split]

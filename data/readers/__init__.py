"""Dataset readers: each returns `list[Sample]` (see data.records).

Hydra configs call the functions directly via `_target_` (plain keyword arguments) or go
through `read_dataset(name, **kwargs)`.
"""

from __future__ import annotations

from collections.abc import Callable

from data.errors import DataUnavailableError
from data.readers.captions import read_caption_csv, read_coco_captions, read_flickr30k_results
from data.readers.icons import (read_game_icons, read_iconify, read_mdi, read_noto_emoji, read_phosphor,
                                read_tabler, read_twemoji)
from data.readers.openclipart import read_openclipart
from data.records import Sample

READERS: dict[str, Callable[..., list[Sample]]] = {
    "captions_csv": read_caption_csv,
    "flickr8k": read_caption_csv,
    "flickr30k": read_flickr30k_results,
    "coco": read_coco_captions,
    "openclipart": read_openclipart,
    "tabler": read_tabler,
    "mdi": read_mdi,
    "phosphor": read_phosphor,
    "iconify": read_iconify,
    "game_icons": read_game_icons,
    "twemoji": read_twemoji,
    "noto_emoji": read_noto_emoji,
}


def read_dataset(name: str, **kwargs) -> list[Sample]:
    """Read a dataset by registry name with the reader's keyword arguments."""
    try:
        reader = READERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(READERS)}") from None
    return reader(**kwargs)


__all__ = [
    "DataUnavailableError", "READERS", "read_dataset", "read_caption_csv",
    "read_flickr30k_results", "read_coco_captions", "read_openclipart",
    "read_tabler", "read_mdi", "read_phosphor", "read_iconify", "read_game_icons", "read_twemoji",
    "read_noto_emoji",
]

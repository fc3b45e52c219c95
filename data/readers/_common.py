"""Small helpers shared by the caption-file readers."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

from data.errors import DataUnavailableError
from data.records import Sample

log = logging.getLogger("data.readers")

_WS = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:])(?=\s|$)")


def require_file(path: str | os.PathLike, what: str) -> str:
    """Absolute path of an existing file, or a DataUnavailableError naming it."""
    p = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isfile(p):
        raise DataUnavailableError(
            f"{what} not found: {p} (point data.csv= / data.json= / data.image_root= at the right place)"
        )
    return p


def clean_caption(text: str) -> str:
    """Collapse whitespace and drop the space Flickr puts before final punctuation."""
    text = _WS.sub(" ", text).strip()
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def resolve_image(name: str, base_dir: str) -> str:
    name = os.path.expanduser(name)
    return os.path.normpath(name if os.path.isabs(name) else os.path.join(base_dir, name))


def build_samples(
    rows: Iterable[tuple[str, str, str | None]],
    base_dir: str,
    source: str,
    skip_missing: bool = True,
) -> list[Sample]:
    """Group (image, caption, group) rows by image, in order of first appearance.

    image_id is the image name as written in the file. Images that do not exist on disk
    are dropped with a warning when `skip_missing` (the default); if none exists at all the
    image folder is almost surely wrong, so that raises.
    """
    captions: dict[str, list[str]] = {}
    groups: dict[str, str | None] = {}
    for image, caption, group in rows:
        image = image.strip()
        if not image:
            continue
        caps = captions.setdefault(image, [])
        caption = clean_caption(caption or "")
        if caption and caption not in caps:
            caps.append(caption)
        if group and not groups.get(image):
            groups[image] = group.strip() or None
    samples, missing, no_caption = [], [], 0
    for image, caps in captions.items():
        if not caps:
            no_caption += 1
            continue
        path = resolve_image(image, base_dir)
        if skip_missing and not os.path.exists(path):
            missing.append(path)
            continue
        samples.append(Sample(image_id=image, image_path=path, captions=tuple(caps),
                              group=groups.get(image)))
    if no_caption:
        log.warning("%s: %d images have no caption and were dropped", source, no_caption)
    if missing:
        if not samples:
            raise DataUnavailableError(
                f"{source}: none of the {len(missing)} images exists under {base_dir} "
                f"(e.g. {missing[0]}); pass image_root=... to point at the image folder"
            )
        log.warning("%s: %d images missing on disk were dropped (e.g. %s)",
                    source, len(missing), missing[0])
    log.info("%s: %d images, %d captions", source, len(samples),
             sum(len(s.captions) for s in samples))
    return samples

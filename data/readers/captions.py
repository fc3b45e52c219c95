"""Readers for caption files: caption CSV (Flickr8k layout), Flickr30k results.csv, COCO JSON."""

from __future__ import annotations

import csv
import json
import os
import re

from data.errors import DataUnavailableError
from data.readers._common import build_samples, log, require_file
from data.records import Sample

_IMAGE_COLS = ("image", "image_name", "image_path", "filename", "file_name")
_CAPTION_COLS = ("caption", "comment", "text")


def _find_col(header: list[str], names: tuple[str, ...]) -> int | None:
    for n in names:
        if n in header:
            return header.index(n)
    return None


def read_caption_csv(
    csv_path: str, image_root: str | None = None, skip_missing: bool = True
) -> list[Sample]:
    """CSV with header `image,caption` (+ optional `group`), one row per image-caption pair.

    Several rows per image are grouped into one Sample (captions in file order, exact
    duplicates dropped). Commas inside quoted captions are fine; an unquoted caption that
    contains commas (extra fields) is re-joined. Image paths are absolute or relative to
    `image_root` (default: the CSV's folder); image_id is the path as written.
    """
    path = require_file(csv_path, "caption CSV")
    base = os.path.expanduser(image_root) if image_root else os.path.dirname(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        i_img, i_cap = _find_col(header, _IMAGE_COLS), _find_col(header, _CAPTION_COLS)
        if i_img is None or i_cap is None:
            raise ValueError(f"{path}: expected a header with columns image,caption; got {header}")
        i_grp = _find_col(header, ("group", "category"))
        n = len(header)

        def rows():
            for row in reader:
                if not row or not any(c.strip() for c in row):
                    continue
                if len(row) > n:  # unquoted commas in the caption: re-join the surplus
                    k = i_cap + len(row) - n + 1
                    row = row[:i_cap] + [",".join(row[i_cap:k])] + row[k:]
                if len(row) <= max(i_img, i_cap):
                    continue
                grp = row[i_grp] if i_grp is not None and i_grp < len(row) else None
                yield row[i_img], row[i_cap], grp

        return build_samples(rows(), base, f"caption CSV {path}", skip_missing)


_NUM_THEN_TEXT = re.compile(r"^\s*(\d+)\s+(.*)$", re.S)


def read_flickr30k_results(
    csv_path: str, image_root: str | None = None, skip_missing: bool = True
) -> list[Sample]:
    """Flickr30k `results.csv`: `image_name| comment_number| comment`, pipe-separated.

    Fields carry stray spaces. One known row lost its second pipe (`2199200615.jpg| 4 A dog
    runs across the grass .`): the number and text are split apart again; rows with no
    comment are skipped. Images resolve against `image_root`, else `<csv dir>/flickr30k_images`
    when that folder exists (the Kaggle layout), else the CSV's folder.
    """
    path = require_file(csv_path, "Flickr30k results.csv")
    if image_root:
        base = os.path.expanduser(image_root)
    else:
        here = os.path.dirname(path)
        nested = os.path.join(here, "flickr30k_images")
        base = nested if os.path.isdir(nested) else here

    broken = 0

    def rows():
        nonlocal broken
        with open(path, encoding="utf-8-sig") as fh:
            first = True
            for line in fh:
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                parts = [p.strip() for p in line.split("|", 2)]
                if first:
                    first = False
                    if parts[0].lower() in ("image_name", "image"):
                        continue
                if len(parts) == 3:
                    image, _num, comment = parts
                elif len(parts) == 2:
                    image, rest = parts
                    m = _NUM_THEN_TEXT.match(rest)
                    comment = m.group(2) if m else ("" if rest.isdigit() else rest)
                    broken += 1
                else:
                    broken += 1
                    continue
                if comment:
                    yield image, comment, None

    samples = build_samples(rows(), base, f"Flickr30k {path}", skip_missing)
    if broken:
        log.info("Flickr30k %s: repaired or skipped %d malformed rows", path, broken)
    return samples


def read_coco_captions(
    json_path: str, image_root: str | None = None, skip_missing: bool = True
) -> list[Sample]:
    """COCO captions JSON (`images`: id/file_name, `annotations`: image_id/caption).

    image_id is the file_name; images resolve against `image_root` (default: the JSON's
    folder). Images without any annotation are dropped.
    """
    path = require_file(json_path, "COCO captions JSON")
    base = os.path.expanduser(image_root) if image_root else os.path.dirname(path)
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    try:
        files = {img["id"]: img["file_name"] for img in data["images"]}
        anns = data["annotations"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO captions file (missing {e})") from e
    by_image: dict[int, list[str]] = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(a.get("caption", ""))
    unknown = sum(1 for i in by_image if i not in files)
    if unknown:
        log.warning("COCO %s: %d annotated image ids have no image entry", path, unknown)
    bare = sum(1 for i in files if i not in by_image)
    if bare:
        log.info("COCO %s: %d images without captions were dropped", path, bare)
    rows = ((files[i], c, None) for i in files for c in by_image.get(i, ()))
    return build_samples(rows, base, f"COCO {path}", skip_missing)


__all__ = ["read_caption_csv", "read_flickr30k_results", "read_coco_captions",
           "DataUnavailableError"]

"""Generate a small captioned image set: coloured shapes on plain backgrounds.

Used by the tests and for trying the CLIs without a real dataset:
    python -m data.fixtures /tmp/shapes --count 48
writes /tmp/shapes/images/*.{jpg,png} and /tmp/shapes/captions.csv (image,caption,group).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 210, 20),
           "purple": (140, 40, 170), "orange": (245, 140, 20)}
SHAPES = ("circle", "square", "triangle", "cross")


def draw_shape(shape: str, colour: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    margin = rng.randint(size // 10, size // 5)
    box = (margin, margin, size - margin, size - margin)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(size // 2, margin), (size - margin, size - margin), (margin, size - margin)], fill=colour)
    else:
        third = (size - 2 * margin) // 3
        draw.rectangle((margin + third, margin, size - margin - third, size - margin), fill=colour)
        draw.rectangle((margin, margin + third, size - margin, size - margin - third), fill=colour)
    return image


def make_shapes_dataset(root: str | Path, count: int = 24, size: int = 64, seed: int = 0) -> Path:
    """Write `count` images and captions.csv under root; returns the CSV path.

    Captions repeat once every len(COLOURS) * len(SHAPES) images, and each image has two
    phrasings, so several images share captions (as in real caption sets)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    combos = list(itertools.product(COLOURS, SHAPES))
    rows = []
    for number in range(count):
        colour, shape = combos[number % len(combos)]
        suffix = "png" if number % 3 == 0 else "jpg"
        name = f"images/{number:04d}_{colour}_{shape}.{suffix}"
        draw_shape(shape, COLOURS[colour], size, rng).save(root / name)
        rows.append((name, f"a {colour} {shape}", shape))
        rows.append((name, f"{shape} in {colour}", shape))
    csv_path = root / "captions.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "group"])
        writer.writerows(rows)
    return csv_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    print(make_shapes_dataset(args.root, args.count, args.size))


if __name__ == "__main__":
    main()

"""Tests for data.readers (CPU, fast; every fixture file is written into tmp_path)."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter

import pytest
from PIL import Image

from data.errors import DataUnavailableError
from data.readers import (
    read_caption_csv,
    read_coco_captions,
    read_dataset,
    read_flickr30k_results,
    read_openclipart,
)
from data.readers._svg_meta import parse_metadata, read_metadata_head
from data.records import Sample, select_split, split_of


def _img(path, fmt="PNG", color=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, format=fmt)
    return path


# ---------------------------------------------------------------- caption CSV


def test_caption_csv_groups_rows_and_keeps_quoted_commas(tmp_path):
    _img(tmp_path / "imgs" / "a.jpg", "JPEG")
    _img(tmp_path / "imgs" / "b.png")
    abs_c = _img(tmp_path / "elsewhere" / "c.png")
    (tmp_path / "captions.csv").write_text(
        "image,caption,group\n"
        'imgs/a.jpg,"A dog, brown and white, runs .",dogs\n'
        "imgs/b.png,A cat sleeps,cats\n"
        "imgs/a.jpg,A dog  on the grass,\n"
        'imgs/a.jpg,"A dog, brown and white, runs .",dogs\n'  # exact duplicate: dropped
        f"{abs_c},An absolute path,misc\n"
        "\n",
        encoding="utf-8",
    )
    samples = read_caption_csv(str(tmp_path / "captions.csv"))
    by_id = {s.image_id: s for s in samples}
    assert [s.image_id for s in samples] == ["imgs/a.jpg", "imgs/b.png", str(abs_c)]
    a = by_id["imgs/a.jpg"]
    assert a.captions == ("A dog, brown and white, runs.", "A dog on the grass")
    assert a.group == "dogs"
    assert a.image_path == str(tmp_path / "imgs" / "a.jpg")
    assert by_id[str(abs_c)].image_path == str(abs_c)
    assert all(isinstance(s, Sample) and s.aug_captions == () for s in samples)


def test_caption_csv_flickr8k_layout_and_image_root(tmp_path):
    _img(tmp_path / "Images" / "1000_x.jpg", "JPEG")
    _img(tmp_path / "Images" / "2000_y.jpg", "JPEG")
    (tmp_path / "captions.txt").write_text(
        "image,caption\n"
        "1000_x.jpg,A child in a pink dress is climbing up a set of stairs .\n"
        "1000_x.jpg,A girl going into a wooden building .\n"
        "2000_y.jpg,Two dogs, one black, play .\n"  # unquoted commas: re-joined
        "3000_missing.jpg,Not on disk\n",
        encoding="utf-8",
    )
    samples = read_caption_csv(str(tmp_path / "captions.txt"), image_root=str(tmp_path / "Images"))
    assert [s.image_id for s in samples] == ["1000_x.jpg", "2000_y.jpg"]  # missing one dropped
    assert len(samples[0].captions) == 2
    assert samples[1].captions == ("Two dogs, one black, play.",)
    assert samples[0].group is None


def test_caption_csv_errors(tmp_path):
    with pytest.raises(DataUnavailableError, match="nope.csv"):
        read_caption_csv(str(tmp_path / "nope.csv"))
    (tmp_path / "bad.csv").write_text("file,text\nx.png,hi\n")
    with pytest.raises(ValueError, match="image,caption"):
        read_caption_csv(str(tmp_path / "bad.csv"))
    (tmp_path / "c.csv").write_text("image,caption\nx.png,hi\ny.png,there\n")
    with pytest.raises(DataUnavailableError, match="image_root"):
        read_caption_csv(str(tmp_path / "c.csv"))


# ---------------------------------------------------------------- Flickr30k


def test_flickr30k_results_with_stray_spaces_and_broken_rows(tmp_path):
    root = tmp_path / "flickr30k_images"
    for name in ("1000092795.jpg", "2199200615.jpg", "3000.jpg"):
        _img(root / "flickr30k_images" / name, "JPEG")
    (root / "results.csv").write_text(
        "image_name| comment_number| comment\n"
        "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands .\n"
        "1000092795.jpg| 1| Two young , White males are outside near many bushes .\n"
        "2199200615.jpg| 3| A dog runs .\n"
        "2199200615.jpg| 4   A dog runs across the grass .\n"  # the known row missing a pipe
        "3000.jpg| 0| A man | with a pipe in the text\n"
        "3000.jpg| 1|\n"  # no comment
        "3000.jpg| 2\n",
        encoding="utf-8",
    )
    samples = read_flickr30k_results(str(root / "results.csv"))
    by_id = {s.image_id: s for s in samples}
    assert list(by_id) == ["1000092795.jpg", "2199200615.jpg", "3000.jpg"]
    assert by_id["1000092795.jpg"].captions[1] == "Two young, White males are outside near many bushes."
    assert by_id["2199200615.jpg"].captions == ("A dog runs.", "A dog runs across the grass.")
    assert by_id["3000.jpg"].captions == ("A man | with a pipe in the text",)
    assert by_id["3000.jpg"].image_path == str(root / "flickr30k_images" / "3000.jpg")


# ---------------------------------------------------------------- COCO


def test_coco_captions(tmp_path):
    _img(tmp_path / "val2017" / "000000000139.jpg", "JPEG")
    _img(tmp_path / "val2017" / "000000000285.jpg", "JPEG")
    _img(tmp_path / "val2017" / "000000000632.jpg", "JPEG")
    data = {
        "images": [
            {"id": 139, "file_name": "000000000139.jpg"},
            {"id": 285, "file_name": "000000000285.jpg"},
            {"id": 632, "file_name": "000000000632.jpg"},  # no annotation
        ],
        "annotations": [
            {"id": 1, "image_id": 285, "caption": "A big brown bear."},
            {"id": 2, "image_id": 139, "caption": "A room with a TV."},
            {"id": 3, "image_id": 285, "caption": "  A bear sitting\nin the grass. "},
        ],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(data))
    samples = read_coco_captions(str(tmp_path / "annotations" / "captions_val2017.json"),
                                 image_root=str(tmp_path / "val2017"))
    by_id = {s.image_id: s for s in samples}
    assert sorted(by_id) == ["000000000139.jpg", "000000000285.jpg"]
    assert by_id["000000000285.jpg"].captions == ("A big brown bear.", "A bear sitting in the grass.")
    with pytest.raises(DataUnavailableError, match="missing.json"):
        read_coco_captions(str(tmp_path / "missing.json"), image_root=str(tmp_path))


# ---------------------------------------------------------------- SVG metadata


def _svg(title, keywords=(), creator="John Doe", description="", pad=0, pre_pad=0):
    lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    return (
        '<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
        'xmlns:cc="http://web.resource.org/cc/" xmlns:dc="http://purl.org/dc/elements/1.1/">\n'
        + ("<defs>" + "<g/>" * (pre_pad // 4) + "</defs>\n")
        + "<metadata><rdf:RDF><cc:Work rdf:about=\"\">\n"
        f"<dc:title>{title}</dc:title>\n<dc:description>{description}</dc:description>\n"
        f"<dc:subject><rdf:Bag>{lis}</rdf:Bag></dc:subject>\n"
        '<dc:publisher><cc:Agent rdf:about="http://www.openclipart.org">'
        "<dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>\n"
        f"<dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>\n"
        "</cc:Work></rdf:RDF></metadata>\n"
        + '<path d="' + "M 0 0 L 1 1 " * (pad // 12) + '"/>\n</svg>\n'
    )


def test_parse_metadata_takes_the_work_title_not_agent_titles(tmp_path):
    text = _svg("Red &amp;amp; green apple", ["fruit", "food, red", "", "unsorted"],
                creator="Jane Roe", description="An apple.")
    # Creator block first: its dc:title must not be mistaken for the work's title.
    text = text.replace("<dc:title>Red", "<dc:creator><cc:Agent><dc:title>Someone</dc:title>"
                        "</cc:Agent></dc:creator><dc:title>Red", 1)
    meta = parse_metadata(text)
    assert meta.title == "Red & green apple"
    assert meta.description == "An apple."
    assert meta.keywords == ["fruit", "food", "red", "unsorted"]
    assert meta.creator == "Someone"
    alt = parse_metadata("<rdf:RDF><cc:Work><dc:title><rdf:Alt><rdf:li xml:lang='en'>Bird"
                         "</rdf:li></rdf:Alt></dc:title></cc:Work></rdf:RDF>")
    assert alt.title == "Bird" and alt.keywords == []
    assert parse_metadata("<svg><path/></svg>").title == ""


def test_read_metadata_head_stops_early_and_finds_late_metadata(tmp_path):
    big = tmp_path / "big.svg"
    big.write_text(_svg("Huge", ["x"], pad=500_000))
    head = read_metadata_head(str(big))
    assert head.endswith("</rdf:RDF>") and len(head) < 70_000
    late = tmp_path / "late.svg"
    late.write_text(_svg("Late title", ["y"], pre_pad=150_000))
    assert parse_metadata(read_metadata_head(str(late))).title == "Late title"


# ---------------------------------------------------------------- Openclipart


def _clip(root, rel, svg_text, color=(10, 120, 200)):
    _img(root / "png" / f"{rel}.png", color=color)
    path = root / "svg" / f"{rel}.svg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(svg_text, encoding="utf-8")


@pytest.fixture
def clipart_root(tmp_path):
    root = tmp_path / "openclipart"
    # A good title; publisher/creator dc:title elements must be ignored.
    _clip(root, "animals/mammals/happy_cat_john_doe_01",
          _svg("Happy cat", ["cat", "mammal", "animal", "unsorted", "clip art", "John Doe"],
               description="A cat that smiles."))
    # Same picture symlinked from another category (the packaging's de-duplication).
    (root / "png" / "people").mkdir(parents=True)
    os.symlink(root / "png" / "animals/mammals/happy_cat_john_doe_01.png",
               root / "png" / "people" / "happy_cat_john_doe_02.png")
    (root / "svg" / "people").mkdir(parents=True)
    os.symlink(root / "svg" / "animals/mammals/happy_cat_john_doe_01.svg",
               root / "svg" / "people" / "happy_cat_john_doe_02.svg")
    # A collection title -> the file stem (author suffix removed) plus keywords.
    _clip(root, "food/fruit/red_apple_john_doe_01",
          _svg("Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)",
               ["hash", "fruit", "food"]))
    # A title shared by many different pictures (collection by frequency) + a star series.
    for n, k in [(12, 5), (7, 3), (9, 2)]:
        _clip(root, f"shapes/stars/star_{n}pt{k:02d}step",
              _svg("Mega Pack", ["stars", "geometry", "magick"]))
    # An author credit as the title, keywords only.
    _clip(root, "plants/x_01", _svg("C Doe John", ["tree", "plant"]))
    # A file-like title, normalized into words.
    _clip(root, "tools/big_hammer_01", _svg("big_hammer.svg", ["tool"], creator="Ann Smith"))
    # Nothing usable at all: dropped.
    _clip(root, "special/zz_01", _svg("", ["unsorted", ""]))
    return root


def test_openclipart_captions_and_report(clipart_root):
    report: dict = {}
    samples = read_openclipart(root=str(clipart_root), report=report, collection_min_count=2)
    by_id = {s.image_id: s for s in samples}
    assert set(by_id) == {
        "animals/mammals/happy_cat_john_doe_01.png", "food/fruit/red_apple_john_doe_01.png",
        "shapes/stars/star_12pt05step.png", "shapes/stars/star_7pt03step.png",
        "shapes/stars/star_9pt02step.png", "plants/x_01.png", "tools/big_hammer_01.png",
    }
    cat = by_id["animals/mammals/happy_cat_john_doe_01.png"]
    assert cat.captions[0].startswith("Happy cat, ")
    assert set(cat.captions[0].split(", ")[1:]) == {"mammal", "animal"}  # "cat" is in the title
    assert "Happy cat" in cat.aug_captions and "A cat that smiles." in cat.aug_captions
    assert cat.captions[0] not in cat.aug_captions
    assert cat.group == "animals"
    assert cat.image_path == str(clipart_root / "png" / "animals/mammals/happy_cat_john_doe_01.png")
    assert by_id["food/fruit/red_apple_john_doe_01.png"].captions == ("red apple, fruit, food",)
    assert by_id["shapes/stars/star_12pt05step.png"].captions[0].startswith("star polygon with 12 points")
    assert by_id["plants/x_01.png"].captions[0] in ("tree, plant", "plant, tree")
    assert by_id["tools/big_hammer_01.png"].captions == ("big hammer, tool",)
    every = [c for s in samples for c in s.captions + s.aug_captions]
    for junk in ("Mega Pack", "Open Clip Art Library", "John Doe", "unsorted", "clip art",
                 "Flat Icon", "magick", "hash"):
        assert not any(junk.lower() in c.lower() for c in every), junk
    assert report["images"] == 7
    assert report["symlink_duplicates"] == 1
    assert report["dropped_no_caption"] == 1
    assert report["titles_kept"] == 2
    assert report["titles_junk_dropped"] == 6
    assert report["title_dropped_collection_frequent"] == 3
    assert report["captions_from_filename"] == 1
    assert report["captions_from_keywords"] == 1
    assert report["captions_from_series"] == 3
    # Deterministic, including the shuffled keyword subsets in aug_captions.
    assert read_openclipart(root=str(clipart_root), collection_min_count=2) == samples


def test_openclipart_without_dedupe_keeps_symlinks(clipart_root):
    samples = read_openclipart(root=str(clipart_root), collection_min_count=2, dedupe_symlinks=False)
    assert "people/happy_cat_john_doe_02.png" in {s.image_id for s in samples}


def test_openclipart_missing_packages_message(tmp_path):
    with pytest.raises(DataUnavailableError) as e:
        read_openclipart(root=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "sudo apt-get install openclipart-png openclipart-svg" in msg and "data.reader.root=" in msg


def test_openclipart_logs_report(clipart_root, caplog):
    with caplog.at_level(logging.INFO, logger="data.readers.openclipart"):
        read_openclipart(root=str(clipart_root), collection_min_count=2)
    assert "symlink_duplicates" in caplog.text


# ---------------------------------------------------------------- registry and splits


def test_read_dataset_registry(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "c.csv").write_text("image,caption\na.png,hello\n")
    assert read_dataset("captions_csv", csv_path=str(tmp_path / "c.csv")) == read_caption_csv(
        str(tmp_path / "c.csv"))
    with pytest.raises(ValueError, match="openclipart"):
        read_dataset("imagenet")


def test_split_is_deterministic_and_roughly_80_10_10():
    ids = [f"img_{i:05d}.jpg" for i in range(10_000)]
    first = [split_of(i) for i in ids]
    assert first == [split_of(i) for i in ids]
    counts = Counter(first)
    assert abs(counts["train"] - 8000) < 250
    assert abs(counts["val"] - 1000) < 150 and abs(counts["test"] - 1000) < 150
    samples = [Sample(image_id=i, image_path=i, captions=("x",)) for i in ids[:500]]
    parts = [select_split(samples, s) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == 500
    assert not {s.image_id for s in parts[0]} & {s.image_id for s in parts[2]}

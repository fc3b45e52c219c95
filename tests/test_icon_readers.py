"""Tests for the icon / emoji readers (data.readers.icons) and the SVG renderer (data.render).

Every package folder is a tiny fake written into tmp_path in the real package's layout
(see scripts/fetch_datasets.sh for the real ones); rendering is real (resvg) at 48 px.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.errors import DataUnavailableError
from data.readers import READERS, read_iconify, read_mdi, read_phosphor, read_tabler
from data.readers.icons import compose_caption, name_words, parse_phosphor_catalog
from data.records import Sample, select_split, split_of
from data.render import RenderJob, colour_scheme, iconify_svg, render_jobs, render_svg

SIZE = 48
HOUSE = '<path d="M5 12l-2 0l9 -9l9 9l-2 0"/><path d="M5 12v7a2 2 0 0 0 2 2h10a2 2 0 0 0 2 -2v-7"/>'
BLOB = '<path d="M4 4h16v16H4z"/>'


def _svg(body: str, style: str = "outline", box: int = 24) -> str:
    paint = ('fill="none" stroke="currentColor" stroke-width="2"' if style == "outline"
             else 'fill="currentColor"')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{box}" height="{box}" viewBox="0 0 {box} {box}" {paint}>{body}</svg>'


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
        return np.asarray(im).astype(int)


def _by_id(samples: list[Sample]) -> dict[str, Sample]:
    return {s.image_id: s for s in samples}


# ---------------------------------------------------------------- fake packages


@pytest.fixture
def tabler_root(tmp_path):
    root = tmp_path / "tabler"
    meta = {
        "home": {"name": "home", "category": "Buildings",
                 "tags": ["home", "house", "homepage", "main", "building"],
                 "styles": {"outline": {}, "filled": {}}},
        "dog": {"name": "dog", "category": "Animals", "tags": ["dog", "puppy", "pet", "canine"],
                "styles": {"outline": {}}},
        "a-b": {"name": "a-b", "category": "Text", "tags": ["ab-test", "compare"], "styles": {"outline": {}}},
        "a-b-2": {"name": "a-b-2", "category": "Text", "tags": ["ab-test", "split-test"], "styles": {"outline": {}}},
        "broken": {"name": "broken", "category": "System", "tags": ["oops"], "styles": {"outline": {}}},
    }
    _write(root / "icons.json", json.dumps(meta))
    for name in ("home", "dog", "a-b", "a-b-2"):
        _write(root / "icons" / "outline" / f"{name}.svg", _svg(HOUSE))
    _write(root / "icons" / "outline" / "broken.svg", "<svg this is not xml")
    _write(root / "icons" / "filled" / "home.svg", _svg(BLOB, "filled"))
    return root


def test_tabler_captions_ids_groups_and_renders(tabler_root, tmp_path):
    report: dict = {}
    samples = read_tabler(str(tabler_root), render_dir=str(tmp_path / "cache"), size=SIZE, report=report)
    got = _by_id(samples)
    assert set(got) == {"tabler/outline/home", "tabler/filled/home", "tabler/outline/dog",
                        "tabler/outline/a-b", "tabler/outline/a-b-2"}
    home, filled = got["tabler/outline/home"], got["tabler/filled/home"]
    assert home.captions == ("home, house, homepage, buildings",)
    assert filled.captions == home.captions and home.group == "Buildings"
    assert home.split_key == filled.split_key == "tabler/home"
    assert "home" in home.aug_captions and "home filled" in filled.aug_captions
    assert "home, buildings" in home.aug_captions and home.captions[0] not in home.aug_captions
    assert got["tabler/outline/dog"].captions == ("dog, puppy, pet, animals",)
    # a trailing version number of a name that also exists without it is dropped
    assert got["tabler/outline/a-b-2"].captions[0].startswith("a b, ab-test")
    # the invalid SVG is skipped and counted, nothing else is lost
    assert report["skipped_unrenderable"] == 1 and report["images"] == 5
    assert "tabler/outline/broken" in report["skipped_examples"][0]
    assert report["groups"] == 3 and report["distinct_captions"] == 4
    for s in samples:
        assert s.image_path.startswith(str(tmp_path / "cache" / "tabler" / str(SIZE)))
        _pixels(s.image_path)
    # second read: everything comes from the cache
    again: dict = {}
    assert read_tabler(str(tabler_root), render_dir=str(tmp_path / "cache"), size=SIZE, report=again) == samples
    assert again["rendered_now"] == 0 and again["render_cached"] == 5  # the broken one is retried, not cached
    # styles restricts what is read
    only = read_tabler(str(tabler_root), render_dir=str(tmp_path / "cache"), size=SIZE, styles=("filled",))
    assert [s.image_id for s in only] == ["tabler/filled/home"]


def test_mdi_aliases_categories_and_outline_split_key(tmp_path):
    root = tmp_path / "mdi"
    meta = [
        {"name": "home", "aliases": ["house"], "tags": ["Home Automation", "Places"], "deprecated": False},
        {"name": "home-outline", "aliases": ["house-outline"], "tags": ["Home Automation", "Places"],
         "deprecated": False},
        {"name": "numeric-1-box", "aliases": ["looks-one"], "tags": ["Alpha / Numeric"], "deprecated": False},
        {"name": "image-area", "aliases": [], "tags": [], "deprecated": True},
    ]
    _write(root / "meta.json", json.dumps(meta))
    for m in meta:
        _write(root / "svg" / f"{m['name']}.svg",
               f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24">{BLOB}</svg>')
    samples = read_mdi(str(root), render_dir=str(tmp_path / "cache"), size=SIZE)
    got = _by_id(samples)
    home, outline = got["mdi/home"], got["mdi/home-outline"]
    assert home.captions == outline.captions == ("home, house, home automation",)
    assert home.split_key == outline.split_key == "mdi/home"
    assert home.group == "Home Automation" and "home outline" in outline.aug_captions
    assert "home, places" in home.aug_captions
    # the name already says part of the compound category: no category in the caption
    assert got["mdi/numeric-1-box"].captions == ("numeric 1 box, looks one",)
    assert got["mdi/image-area"].group == "area"  # no category: the name's last word
    assert len(read_mdi(str(root), render_dir=str(tmp_path / "cache"), size=SIZE,
                        include_deprecated=False)) == 3


PHOSPHOR_MJS = """var t = /* @__PURE__ */ ((i) => (i.REGULAR = "regular", i.THIN = "thin", i.LIGHT = "light", i.BOLD = "bold", i.FILL = "fill", i.DUOTONE = "duotone", i))(t || {}), e = /* @__PURE__ */ ((i) => (i.MAP = "maps & travel", i.SYSTEM = "system", i.NATURE = "nature", i))(e || {}), a = /* @__PURE__ */ ((i) => (i.MAP = "maps & travel", i.WEATHER = "weather & nature", i))(a || {});
const n = [
  {
    name: "acorn",
    pascal_name: "Acorn",
    categories: [e.NATURE],
    figma_category: a.WEATHER,
    tags: [
      "*new*",
      "savings",
      "nut",
    ],
    codepoint: 60314,
    published_in: 2.1,
    updated_in: 2.1
  },
  {
    name: "house",
    pascal_name: "House",
    alias: { name: "home", pascal_name: "Home" },
    categories: [e.MAP, e.SYSTEM],
    figma_category: a.MAP,
    tags: ["homes", "buildings", "places"],
    codepoint: 58050,
    published_in: 1,
    updated_in: 1
  }
];
export {
  a as FigmaCategory,
  e as IconCategory,
  t as IconStyle,
  n as icons
};
"""
WEIGHTS = ("regular", "thin", "light", "bold", "fill", "duotone")


@pytest.fixture
def phosphor_root(tmp_path):
    root = tmp_path / "phosphor"
    _write(root / "dist" / "index.mjs", PHOSPHOR_MJS)
    for name in ("acorn", "house"):
        for w in WEIGHTS:
            fname = f"{name}.svg" if w == "regular" else f"{name}-{w}.svg"
            body = BLOB if w != "duotone" else f'<path opacity="0.2" d="M2 2h20v20H2z"/>{HOUSE}'
            _write(root / "assets" / w / fname,
                   f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="currentColor">{body}</svg>')
    return root


def test_phosphor_catalog_weights_and_shared_split(phosphor_root, tmp_path):
    catalog = parse_phosphor_catalog((phosphor_root / "dist" / "index.mjs").read_text())
    assert catalog[1]["figma_category"] == "maps & travel" and catalog[1]["categories"] == ["maps & travel", "system"]
    assert catalog[0]["tags"] == ["*new*", "savings", "nut"] and catalog[1]["alias"]["name"] == "home"

    samples = read_phosphor(str(phosphor_root), render_dir=str(tmp_path / "cache"), size=SIZE)
    assert len(samples) == 12
    got = _by_id(samples)
    house = got["phosphor/house@bold"]
    assert house.captions == ("house, homes, buildings, maps and travel",)
    assert house.group == "maps & travel" and "home" in house.aug_captions and "house bold" in house.aug_captions
    assert got["phosphor/acorn@thin"].captions == ("acorn, savings, nut, weather and nature",)  # *new* dropped
    # every weight of an icon: same caption, same split key, so the same split
    for name in ("acorn", "house"):
        mine = [s for s in samples if s.image_id.startswith(f"phosphor/{name}@")]
        assert len(mine) == 6 and len({s.captions for s in mine}) == 1
        assert {s.split_key for s in mine} == {f"phosphor/{name}"}
        where = {split for split in ("train", "val", "test") for s in select_split(mine, split)
                 if s.image_id.startswith(f"phosphor/{name}@")}
        assert len(where) == 1 and where == {split_of(f"phosphor/{name}")}
    # only the weights asked for
    two = read_phosphor(str(phosphor_root), render_dir=str(tmp_path / "cache"), size=SIZE, weights=("bold", "fill"))
    assert sorted(s.image_id for s in two) == ["phosphor/acorn@bold", "phosphor/acorn@fill",
                                               "phosphor/house@bold", "phosphor/house@fill"]
    with pytest.raises(ValueError, match="unknown phosphor weight"):
        read_phosphor(str(phosphor_root), render_dir=str(tmp_path / "cache"), weights=("heavy",))


def test_split_key_default_keeps_image_id_split():
    plain = [Sample(image_id=f"img{i}", image_path="x", captions=("c",)) for i in range(50)]
    for split in ("train", "val", "test"):
        assert [s.image_id for s in select_split(plain, split)] == [
            f"img{i}" for i in range(50) if split_of(f"img{i}") == split]


# ---------------------------------------------------------------- Iconify JSON


def _iconify(root: Path, prefix: str, icons: dict, *, width: int, palette: bool, category: str,
             categories: dict | None = None, aliases: dict | None = None) -> Path:
    _write(root / "icons.json", json.dumps({"prefix": prefix, "icons": icons, "aliases": aliases or {},
                                            "width": width, "height": width}))
    _write(root / "info.json", json.dumps({"prefix": prefix, "palette": palette, "category": category}))
    _write(root / "metadata.json", json.dumps({"categories": categories} if categories else {}))
    return root


def test_iconify_game_icons_mono(tmp_path):
    body = '<path fill="currentColor" d="M64 64h384v384H64z"/>'
    root = _iconify(tmp_path / "game-icons", "game-icons", {
        "sitting-dog": {"body": body}, "abstract-001": {"body": body}, "rank-3": {"body": body},
        "wide-thing": {"body": '<path fill="currentColor" d="M0 0h1024v512H0z"/>', "width": 1024},
        "tall-thing": {"body": '<path fill="currentColor" d="M0 0h256v512H0z"/>', "width": 256},
        "old": {"body": body, "hidden": True},
    }, width=512, palette=False, category="Thematic", aliases={"pup": {"parent": "sitting-dog"}})
    report: dict = {}
    samples = read_iconify(str(root / "icons.json"), "game-icons", render_dir=str(tmp_path / "cache"),
                           size=SIZE, report=report)
    got = _by_id(samples)
    assert set(got) == {"game-icons/sitting-dog", "game-icons/abstract-001", "game-icons/rank-3",
                        "game-icons/wide-thing", "game-icons/tall-thing"}
    dog = got["game-icons/sitting-dog"]
    assert dog.captions == ("sitting dog",) and dog.group == "dog" and dog.split_key is None
    assert "pup" in dog.aug_captions and "sitting dog icon" in dog.aug_captions
    assert got["game-icons/abstract-001"].captions == ("abstract",)
    assert got["game-icons/rank-3"].captions == ("rank 3",) and got["game-icons/rank-3"].group == "rank"
    assert report["hidden_dropped"] == 1
    # a wide icon keeps its aspect ratio: its top and bottom rows are background
    wide = _pixels(got["game-icons/wide-thing"].image_path)
    assert (wide[0] == wide[0, 0]).all() and not (wide[SIZE // 2] == wide[0, 0]).all()
    tall = _pixels(got["game-icons/tall-thing"].image_path)
    ink_rows = np.flatnonzero((np.abs(tall - tall[0, 0]).sum(-1) > 30).any(1))
    assert (tall[:, 0] == tall[0, 0]).all() and ink_rows.size >= SIZE * 0.6  # fits the height
    # the folder works as well as the json path, and the READERS entry
    assert len(read_iconify(str(root), "game-icons", render_dir=str(tmp_path / "cache"), size=SIZE)) == 5
    assert len(READERS["game_icons"](str(root), render_dir=str(tmp_path / "cache"), size=SIZE)) == 5


def test_iconify_emoji_skin_tones_flags_and_colours(tmp_path):
    def face(colour: str) -> dict:
        return {"body": f'<circle cx="18" cy="18" r="16" fill="{colour}"/><circle cx="12" cy="14" r="3" fill="#292f33"/>'}

    icons = {
        "dog-face": face("#c1694f"),
        "waving-hand": face("#ffdc5d"),
        "waving-hand-dark-skin-tone": face("#664131"),
        "waving-hand-medium-light-skin-tone": face("#e2c196"),
        "kiss-person-person-dark-skin-tone-light-skin-tone": face("#aa0000"),
        "kiss-person-person-light-skin-tone-dark-skin-tone": face("#00aa00"),
        "flag-finland": face("#ffffff"),
        "flag-in-hole": face("#00ff00"),
    }
    cats = {"Animals & Nature": ["dog-face"],
            "People & Body": [k for k in icons if k.startswith(("waving", "kiss"))],
            "Flags": ["flag-finland"], "Activities": ["flag-in-hole"]}
    root = _iconify(tmp_path / "twemoji", "twemoji", icons, width=36, palette=True, category="Emoji",
                    categories=cats, aliases={"flag-for-flag-finland": {"parent": "flag-finland"}})
    report: dict = {}
    samples = read_iconify(str(root), "twemoji", render_dir=str(tmp_path / "cache"), size=SIZE, report=report)
    got = _by_id(samples)
    assert set(got) == {"twemoji/dog-face", "twemoji/waving-hand", "twemoji/kiss-person-person",
                        "twemoji/flag-finland", "twemoji/flag-in-hole"}
    assert report["skin_tone_variants_dropped"] == 3
    dog = got["twemoji/dog-face"]
    assert dog.captions == ("dog face",) and dog.group == "Animals & Nature"
    assert dog.split_key == "emoji/dog-face" and "dog face emoji" in dog.aug_captions
    assert got["twemoji/flag-finland"].captions == ("flag of finland",)
    assert "finland flag" in got["twemoji/flag-finland"].aug_captions
    assert got["twemoji/flag-in-hole"].captions == ("flag in hole",)
    assert got["twemoji/kiss-person-person"].captions == ("kiss person person",)
    # the toneless emoji is the one kept: its own yellow is in the picture
    hand = _pixels(got["twemoji/waving-hand"].image_path)
    assert (np.abs(hand[SIZE // 2, SIZE // 2] - [0xff, 0xdc, 0x5d]) <= 2).all()
    # colour emoji keep their colours (not recoloured as a monochrome icon)
    dogpx = _pixels(dog.image_path)
    assert (np.abs(dogpx[SIZE // 2, SIZE // 2 + 8] - [0xc1, 0x69, 0x4f]) <= 2).all()


# ---------------------------------------------------------------- rendering


def test_colour_schemes_are_deterministic_and_varied():
    keys = [f"tabler/outline/icon{i}" for i in range(300)]
    mono = [colour_scheme(k, True) for k in keys]
    assert mono == [colour_scheme(k, True) for k in keys]
    kinds = Counter(s["kind"] for s in mono)
    assert set(kinds) == {"white", "tint", "dark"} and kinds["white"] > kinds["dark"] > 10
    assert len({s["fg"] for s in mono}) > 15 and len({s["bg"] for s in mono}) > 50
    lum = lambda h: sum(int(h[i:i + 2], 16) * w for i, w in ((1, .299), (3, .587), (5, .114)))  # noqa: E731
    for s in mono:  # contrast: dark ink on light backgrounds, light ink on dark ones
        assert (lum(s["fg"]) > 150 and lum(s["bg"]) < 80) if s["kind"] == "dark" else lum(s["fg"]) < 140 < lum(s["bg"])
    colour = [colour_scheme(k, False) for k in keys]
    assert all(s["fg"] is None for s in colour) and {s["kind"] for s in colour} == {"white", "tint", "dark"}


def test_render_mono_paints_scheme_colours_and_is_reproducible():
    svg = _svg(BLOB, "filled")
    keys = [f"k{i}" for i in range(200)]
    dark = next(k for k in keys if colour_scheme(k, True)["kind"] == "dark")
    light = next(k for k in keys if colour_scheme(k, True)["kind"] == "white")
    for key in (dark, light):
        scheme = colour_scheme(key, True)
        px = np.asarray(render_svg(svg, key, SIZE, mono=True)).astype(int)
        bg = [int(scheme["bg"][i:i + 2], 16) for i in (1, 3, 5)]
        fg = [int(scheme["fg"][i:i + 2], 16) for i in (1, 3, 5)]
        assert (np.abs(px[0, 0] - bg) <= 1).all() and (np.abs(px[SIZE // 2, SIZE // 2] - fg) <= 1).all()
    a = render_svg(svg, "same-key", SIZE).tobytes()
    assert a == render_svg(svg, "same-key", SIZE).tobytes()
    # a white cut-out inside a monochrome icon shows the background, not the ink
    cut = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><path d="M2 2h20v20H2z"/>'
           '<path fill="#fff" d="M9 9h6v6H9z"/></svg>')
    px = np.asarray(render_svg(cut, light, SIZE)).astype(int)
    assert (np.abs(px[SIZE // 2, SIZE // 2] - px[0, 0]) <= 1).all()
    with pytest.raises(ValueError):
        render_svg('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"></svg>', "empty", SIZE)


def test_iconify_svg_view_box():
    assert iconify_svg("<g/>", 36, 36) == ('<svg xmlns="http://www.w3.org/2000/svg" '
                                           'xmlns:xlink="http://www.w3.org/1999/xlink" viewBox="0 0 36 36"><g/></svg>')
    assert 'viewBox="-2 1 20.5 16"' in iconify_svg("", 20.5, 16, -2, 1)


def test_render_jobs_pool_counts_failures(tmp_path):
    good = _svg(BLOB, "filled")
    jobs = [RenderJob(key=f"j{i}", out_path=str(tmp_path / f"{i}.png"),
                      svg_text=good if i % 10 else "<svg nope", mono=True) for i in range(70)]
    rep = render_jobs(jobs, size=16, processes=2, progress=False)
    assert rep.rendered == 63 and len(rep.failed) == 7 and rep.failed_keys == {f"j{i}" for i in range(0, 70, 10)}
    assert not list(tmp_path.glob("*.tmp"))
    rep2 = render_jobs(jobs, size=16, processes=2, progress=False)
    assert rep2.cached == 63 and rep2.rendered == 0 and len(rep2.failed) == 7


# ---------------------------------------------------------------- text and missing data


def test_name_words_and_compose():
    known = {"a-b", "a-b-2", "stack", "stack-3", "number-1"}
    assert name_words("a-b-2", known) == "a b"
    assert name_words("number-1", known) == "number 1"
    assert name_words("home-variant-outline") == "home"
    assert name_words("tarot-00-the-fool") == "tarot the fool"
    assert name_words("outline") == "outline"
    assert compose_caption("home", ["home", "house", "homes", "homepage", "main"], "buildings") == \
        "home, house, homepage, buildings"


@pytest.mark.parametrize("call", [
    lambda p: read_tabler(p),
    lambda p: read_mdi(p),
    lambda p: read_phosphor(p),
    lambda p: read_iconify(p, "twemoji"),
    lambda p: read_iconify(None, "noto"),
])
def test_missing_data_says_how_to_fetch(call, tmp_path, monkeypatch):
    monkeypatch.setenv("SMART_GALLERY_DATA", str(tmp_path / "nothing-here"))
    with pytest.raises(DataUnavailableError, match=r"scripts/fetch_datasets\.sh"):
        call(str(tmp_path / "absent"))


# ---------------------------------------------------------------- configs


def test_data_configs_resolve_and_instantiate(tabler_root, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    configs = Path(__file__).resolve().parents[1] / "configs"
    monkeypatch.setenv("SMART_GALLERY_DATA", str(tabler_root.parent))
    expected = {"tabler": "tabler", "mdi": "mdi", "phosphor": "phosphor", "game_icons": "game-icons/icons.json",
                "twemoji": "twemoji/icons.json", "noto_emoji": "noto/icons.json"}
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        for name, where in expected.items():
            cfg = compose(config_name="train", overrides=[f"data={name}"])
            reader = cfg.data.reader
            assert cfg.data.name == name and cfg.data.caption_augmentation is True
            assert (reader.get("root") or reader.get("json_path")) == str(tabler_root.parent / where)
        cfg = compose(config_name="train", overrides=["data=tabler", f"data.reader.size={SIZE}"])
        samples = instantiate(cfg.data.reader)
    assert len(samples) == 5
    assert samples[0].image_path.startswith(str(tabler_root.parent / "rendered" / "tabler" / str(SIZE)))

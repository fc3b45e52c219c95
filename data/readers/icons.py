"""Tagged icon and emoji sets from the npm registry, rendered to PNG, as captioned samples.

Fetch them with `bash scripts/fetch_datasets.sh` (npm pack; unpacked with the tarball's
`package/` folder stripped into `$SMART_GALLERY_DATA/<short-name>/`, by default
`~/.cache/smart-gallery/datasets/`):

| reader | package | layout read |
| --- | --- | --- |
| `read_tabler` | `@tabler/icons` 3.51.0 | `icons/{outline,filled}/<name>.svg`, `icons.json` (category, tags) |
| `read_mdi` | `@mdi/svg` 7.4.47 | `svg/<name>.svg`, `meta.json` (aliases, tags = categories) |
| `read_phosphor` | `@phosphor-icons/core` 2.1.1 | `assets/<weight>/<name>[-<weight>].svg`, catalog in `dist/index.mjs` |
| `read_iconify` | `@iconify-json/{game-icons,twemoji,noto}` | `icons.json` (Iconify JSON), `metadata.json`, `info.json` |

Every SVG is rendered once into the render cache (see data.render: fixed size, colours varied
per image id); `image_path` is the PNG. Unrenderable SVGs are skipped and counted.

Image ids are namespaced by set (`tabler/outline/home`, `mdi/home`, `phosphor/house@bold`,
`twemoji/dog-face`) so they never collide in a mixture. Where one thing comes as several
images (tabler outline + filled, mdi `home` + `home-outline`, phosphor's six weights) they
share a `split_key` (`tabler/home`, `mdi/home`, `phosphor/house`) so they always land in
one split. The same emoji in twemoji and noto shares `emoji/<name>`, for the same reason.

Captions are written the way people search: the name's words (`-`/`_` split; trailing style
words such as `outline`/`filled`/`variant`, zero-padded series numbers and a trailing
version number of a name that also exists without it are dropped), then up to `max_tags`
tags or aliases that add new words, then the category: "home, house, homepage, buildings".
`aug_captions` holds other phrasings: the name alone, "<name> icon" / "<name> emoji", the
name with its style, name + tag subsets, aliases, name + category. `group` is the set's
category where it has one (tabler category, mdi first tag, phosphor figma category, emoji
category), else the name's last word (its head noun: "sitting dog" -> "dog").
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from data.errors import DataUnavailableError
from data.records import Sample
from data.render import DEFAULT_SIZE, RenderJob, data_home, default_render_dir, iconify_svg, render_jobs

log = logging.getLogger("data.readers.icons")

FETCH_HINT = ("run `bash scripts/fetch_datasets.sh` (npm pack into $SMART_GALLERY_DATA, "
              "default ~/.cache/smart-gallery/datasets)")
PHOSPHOR_WEIGHTS = ("regular", "thin", "light", "bold", "fill", "duotone")
TABLER_STYLES = ("outline", "filled")

# Trailing name words that name a drawing style, not the thing.
_STYLE_WORDS = {"outline", "outlined", "filled", "solid", "variant"}
_SKIN_TONE = re.compile(r"-(?:medium-light|medium-dark|light|medium|dark)-skin-tone")
_WORD = re.compile(r"[a-z0-9]+")


# ---------------------------------------------------------------- caption text


def name_words(name: str, known: set[str] | None = None, drop_version: bool = True) -> str:
    """The words of an icon name as a phrase: `arrow-left_2` -> "arrow left".

    Drops trailing style words (outline, filled, variant, ...), zero-padded series numbers
    (`abstract-001`) and, when `drop_version`, a trailing number of a name that also exists
    without it in `known` (`a-b-2` next to `a-b`); other numbers stay ("number 1", "rank 3")."""
    toks = [t for t in re.split(r"[-_\s]+", name.lower()) if t]
    original = list(toks)
    while len(toks) > 1 and toks[-1] in _STYLE_WORDS:
        toks.pop()
    if drop_version and known is not None and len(toks) > 1 and toks[-1].isdigit():
        if "-".join(toks[:-1]) in known:
            toks.pop()
    toks = [t for t in toks if not (t.isdigit() and len(t) > 1 and t.startswith("0"))]
    return " ".join(toks or original)


def _phrase(text: str) -> str:
    """A tag or category as caption text: lower case, `_` as space, `&` as "and"."""
    text = str(text).replace("_", " ").replace("&", " and ").lower()
    return re.sub(r"\s+", " ", text).strip(" ,")


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _said(text: str) -> set[str]:
    return {_stem(w) for w in _WORD.findall(text.lower())}


def _new_words(phrase: str, said: set[str]) -> bool:
    return bool(_said(phrase) - said)


def compose_caption(words: str, extras: Iterable[str], category: str | None = None,
                    max_extras: int = 2) -> str:
    """`words, extra, extra, category`: only extras (and the category) that add new words."""
    parts = [words]
    said = _said(words)
    for extra in extras:
        if len(parts) > max_extras:
            break
        if extra and _new_words(extra, said):
            parts.append(extra)
            said |= _said(extra)
    if category and _new_words(category, said):
        parts.append(category)
    return ", ".join(parts)


def _augment(key: str, caption: str, words: str, extras: Sequence[str], category: str | None,
             more: Iterable[str] = (), noun: str = "icon") -> tuple[str, ...]:
    """Other phrasings of one image, deterministic per key."""
    rng = random.Random(key)
    aug = [words, f"{words} {noun}", *more]
    useful = [e for e in dict.fromkeys(extras) if e and _new_words(e, _said(words))]
    if len(useful) >= 2:
        for _ in range(2):
            aug.append(", ".join([words] + rng.sample(useful, rng.randint(1, min(3, len(useful))))))
    elif useful:
        aug.append(f"{words}, {useful[0]}")
    if category and _new_words(category, _said(words)):
        aug.append(f"{words}, {category}")
    return tuple(dict.fromkeys(a for a in aug if a and a != caption))


# ---------------------------------------------------------------- shared plumbing


class _Collector:
    """Render jobs and the samples waiting on them; `finish` renders and keeps what rendered."""

    def __init__(self, dataset: str, render_dir: str | None, size: int):
        self.dataset = dataset
        self.size = int(size)
        self.base = os.path.join(os.path.expanduser(render_dir or default_render_dir()), dataset, str(self.size))
        self.jobs: list[RenderJob] = []
        self.samples: list[Sample] = []
        self.counts: Counter = Counter()

    def add(self, sample_kwargs: dict, rel: str, mono: bool, svg_path: str | None = None,
            svg_text: str | None = None) -> None:
        out = os.path.join(self.base, rel + ".png")
        self.jobs.append(RenderJob(key=sample_kwargs["image_id"], out_path=out, svg_path=svg_path,
                                   svg_text=svg_text, mono=mono))
        self.samples.append(Sample(image_path=out, **sample_kwargs))

    def finish(self, processes: int, progress: bool, report: dict | None) -> list[Sample]:
        rep = render_jobs(self.jobs, size=self.size, processes=processes,
                          desc=f"render {self.dataset}", progress=progress)
        failed = rep.failed_keys
        samples = [s for s in self.samples if s.image_id not in failed]
        c = self.counts
        c["images"] = len(samples)
        c["skipped_unrenderable"] = len(failed)
        c["rendered_now"] = rep.rendered
        c["render_cached"] = rep.cached
        c["distinct_captions"] = len({s.captions[0] for s in samples})
        c["groups"] = len({s.group for s in samples})
        stats: dict = dict(sorted(c.items()))
        stats["render_seconds"] = round(rep.seconds, 2)
        stats["render_dir"] = self.base
        if failed:
            stats["skipped_examples"] = [f"{k}: {e}" for k, e in rep.failed[:5]]
        if report is not None:
            report.update(stats)
        log.info("%s: %s", self.dataset, {k: v for k, v in stats.items() if k != "skipped_examples"})
        if not samples:
            raise DataUnavailableError(f"{self.dataset}: no image could be rendered ({len(failed)} failed)")
        return samples


def _root(root: str | os.PathLike | None, short: str) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(root))) if root else os.path.join(data_home(), short)


def _load_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataUnavailableError(f"{what} not found: {path}: {FETCH_HINT}") from None


# ---------------------------------------------------------------- tabler


def read_tabler(root: str | None = None, render_dir: str | None = None, size: int = DEFAULT_SIZE,
                styles: Sequence[str] = TABLER_STYLES, max_tags: int = 2, report: dict | None = None,
                processes: int = 2, progress: bool = True) -> list[Sample]:
    """Tabler icons (`@tabler/icons`): one sample per icon and style (outline, filled).

    image_id `tabler/<style>/<name>`, split_key `tabler/<name>` (both styles in one split),
    group = the icon's category; caption "<name words>, <tag>, <tag>, <category>"."""
    root = _root(root, "tabler")
    bad = [s for s in styles if s not in TABLER_STYLES]
    if bad:
        raise ValueError(f"unknown tabler style(s) {bad}; expected some of {TABLER_STYLES}")
    if not os.path.isdir(os.path.join(root, "icons")):
        raise DataUnavailableError(f"Tabler icons not found at {root} (need icons/ and icons.json): {FETCH_HINT}")
    meta = _load_json(os.path.join(root, "icons.json"), "Tabler icons.json")
    col = _Collector("tabler", render_dir, size)
    for style in styles:
        folder = os.path.join(root, "icons", style)
        files = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".svg")) if os.path.isdir(folder) else []
        names = set(files)
        known = set(meta) | names
        for name in files:
            info = meta.get(name) or {}
            col.counts["no_metadata"] += not info
            words = name_words(name, known)
            tags = [_phrase(t) for t in info.get("tags", [])]
            category = _phrase(info["category"]) if info.get("category") else None
            caption = compose_caption(words, tags, category, max_tags)
            image_id = f"tabler/{style}/{name}"
            col.add(dict(
                image_id=image_id, captions=(caption,), group=info.get("category") or words.split()[-1],
                aug_captions=_augment(image_id, caption, words, tags, category, more=[f"{words} {style}"]),
                split_key=f"tabler/{name}"), rel=f"{style}/{name}", mono=True,
                svg_path=os.path.join(folder, name + ".svg"))
        col.counts[f"style_{style}"] = len(files)
    return col.finish(processes, progress, report)


# ---------------------------------------------------------------- Material Design Icons


def read_mdi(root: str | None = None, render_dir: str | None = None, size: int = DEFAULT_SIZE,
             include_deprecated: bool = True, max_tags: int = 2, report: dict | None = None,
             processes: int = 2, progress: bool = True) -> list[Sample]:
    """Material Design Icons (`@mdi/svg`): one sample per SVG.

    image_id `mdi/<name>`; split_key `mdi/<name without -outline>` (an icon and its outline
    version in one split); group = first tag (mdi's tags are categories, "Home Automation");
    caption "<name words>, <alias>, <alias>, <category>"."""
    root = _root(root, "mdi")
    folder = os.path.join(root, "svg")
    if not os.path.isdir(folder):
        raise DataUnavailableError(
            f"Material Design Icons not found at {root} (need svg/ and meta.json): {FETCH_HINT}")
    meta = {m["name"]: m for m in _load_json(os.path.join(root, "meta.json"), "mdi meta.json")}
    files = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".svg"))
    known = set(meta) | set(files)
    col = _Collector("mdi", render_dir, size)
    for name in files:
        info = meta.get(name) or {}
        col.counts["no_metadata"] += not info
        if info.get("deprecated") and not include_deprecated:
            col.counts["deprecated_dropped"] += 1
            continue
        words = name_words(name, known)
        aliases = [name_words(a) for a in info.get("aliases", [])]
        tags = info.get("tags") or []
        # mdi categories are compound ("Text / Content / Format"): the caption takes its
        # first part, unless the name already says one of the parts ("numeric 1 box" in
        # "Alpha / Numeric"); the whole category goes to the augmentations.
        parts = [_phrase(p) for p in re.split(r"\s*[/+]\s*", tags[0])] if tags else []
        category = parts[0] if parts and all(_new_words(p, _said(words)) for p in parts) else None
        caption = compose_caption(words, aliases, category, max_tags)
        base = name[:-len("-outline")] if name.endswith("-outline") and name[:-len("-outline")] in known else name
        image_id = f"mdi/{name}"
        more = aliases + [f"{words}, {_mdi_tag(t)}" for t in tags]
        if name.endswith("-outline"):
            more.append(f"{words} outline")
        col.add(dict(
            image_id=image_id, captions=(caption,), group=tags[0] if tags else words.split()[-1],
            aug_captions=_augment(image_id, caption, words, aliases, category, more=more),
            split_key=f"mdi/{base}"), rel=name, mono=True, svg_path=os.path.join(folder, name + ".svg"))
    return col.finish(processes, progress, report)


def _mdi_tag(tag: str) -> str:
    return ", ".join(_phrase(p) for p in re.split(r"\s*[/+]\s*", tag))


# ---------------------------------------------------------------- Phosphor


def parse_phosphor_catalog(js_text: str) -> list[dict]:
    """The icon catalog of `@phosphor-icons/core` from its `dist/index.mjs` (a JS module:
    enum objects, then `const n = [ {name, pascal_name, alias?, categories, figma_category,
    tags, ...}, ... ]`), as plain dicts with the enum references resolved to their strings."""
    enums: dict[str, dict[str, str]] = {}
    enum_iife = r"(\w+) = /\* @__PURE__ \*/ \(\(\w+\) => \((.*?), \w+\)\)\(\1 \|\| \{\}\)"
    for var, members in re.findall(enum_iife, js_text):
        enums[var] = dict(re.findall(r"\w+\.(\w+) = \"([^\"]*)\"", members))
    m = re.search(r"const \w+ = (\[\s*\{.*?\n\]);", js_text, re.S)
    if not m or not enums:
        raise ValueError("no icon catalog found (expected enum objects and `const n = [{...}]`)")
    body = m.group(1)

    def enum_ref(match: re.Match) -> str:
        var, member = match.group(1), match.group(2)
        if var in enums and member in enums[var]:
            return json.dumps(enums[var][member])
        return match.group(0)

    body = re.sub(r"\b([A-Za-z_]\w*)\.([A-Z_][A-Z0-9_]*)\b", enum_ref, body)
    body = re.sub(r"([{,]\s*)([A-Za-z_]\w*)\s*:", r'\1"\2":', body)  # quote keys
    body = re.sub(r",(\s*[}\]])", r"\1", body)  # trailing commas
    return json.loads(body)


def read_phosphor(root: str | None = None, render_dir: str | None = None, size: int = DEFAULT_SIZE,
                  weights: Sequence[str] = PHOSPHOR_WEIGHTS, max_tags: int = 2, report: dict | None = None,
                  processes: int = 2, progress: bool = True) -> list[Sample]:
    """Phosphor icons (`@phosphor-icons/core`): one sample per icon and weight asked for.

    image_id `phosphor/<name>@<weight>`, split_key `phosphor/<name>` (all weights of an icon
    in one split), the same caption for every weight; group = the figma category."""
    root = _root(root, "phosphor")
    bad = [w for w in weights if w not in PHOSPHOR_WEIGHTS]
    if bad:
        raise ValueError(f"unknown phosphor weight(s) {bad}; expected some of {PHOSPHOR_WEIGHTS}")
    catalog_path = os.path.join(root, "dist", "index.mjs")
    if not (os.path.isdir(os.path.join(root, "assets")) and os.path.isfile(catalog_path)):
        raise DataUnavailableError(
            f"Phosphor icons not found at {root} (need assets/<weight>/ and dist/index.mjs): {FETCH_HINT}")
    with open(catalog_path, encoding="utf-8") as f:
        catalog = parse_phosphor_catalog(f.read())
    known = {e["name"] for e in catalog}
    col = _Collector("phosphor", render_dir, size)
    for entry in sorted(catalog, key=lambda e: e["name"]):
        name = entry["name"]
        words = name_words(name, known)
        tags = [_phrase(t) for t in entry.get("tags", []) if not t.startswith("*")]
        category = _phrase(entry["figma_category"]) if entry.get("figma_category") else None
        caption = compose_caption(words, tags, category, max_tags)
        alias = (entry.get("alias") or {}).get("name")
        more = [name_words(alias)] if alias else []
        more += [f"{words}, {_phrase(c)}" for c in entry.get("categories", [])]
        for weight in weights:
            fname = f"{name}.svg" if weight == "regular" else f"{name}-{weight}.svg"
            path = os.path.join(root, "assets", weight, fname)
            if not os.path.isfile(path):
                col.counts["svg_missing"] += 1
                continue
            image_id = f"phosphor/{name}@{weight}"
            col.add(dict(
                image_id=image_id, captions=(caption,), group=entry.get("figma_category") or words.split()[-1],
                aug_captions=_augment(image_id, caption, words, tags, category,
                                      more=more + ([f"{words} {weight}"] if weight != "regular" else [])),
                split_key=f"phosphor/{name}"), rel=f"{weight}/{name}", mono=True, svg_path=path)
            col.counts[f"weight_{weight}"] += 1
    return col.finish(processes, progress, report)


# ---------------------------------------------------------------- Iconify JSON sets


def _emoji_words(name: str, is_flag: bool) -> str:
    """"dog face"; a country flag (`flag-finland`, alias `flag-for-flag-finland`) as
    "flag of finland"."""
    if is_flag and name.startswith("flag-"):
        rest = re.sub(r"^(?:flag-|for-)+", "", name)
        if rest:
            return "flag of " + name_words(rest, drop_version=False)
    return name_words(name, drop_version=False)


def read_iconify(json_path: str | None = None, name: str = "game-icons", render_dir: str | None = None,
                 size: int = DEFAULT_SIZE, mono: bool | None = None, emoji: bool | None = None,
                 include_hidden: bool = False, report: dict | None = None, processes: int = 2,
                 progress: bool = True) -> list[Sample]:
    """An Iconify JSON icon set (`@iconify-json/<set>`): game-icons, twemoji, noto, ...

    `json_path` is the set's `icons.json` or its folder (default `<data_home>/<name>/`);
    `name` namespaces the ids (`<name>/<icon>`) and the render cache. Each icon becomes
    `<svg viewBox="left top width height">body</svg>` with its own or the set's size.
    `mono` (default: not `info.json`'s `palette`) recolours monochrome icons; `emoji`
    (default: `info.json` category "Emoji") keeps one image per emoji across skin tones
    (the toneless one where it exists), captions flags "flag of <country>" and gives every
    image split_key `emoji/<base name>` so the same emoji in two sets shares a split.
    Hidden (deprecated) icons are skipped unless `include_hidden`. group = the category from
    `metadata.json` where the set has one, else the name's last word."""
    path = os.path.expanduser(os.fspath(json_path)) if json_path else os.path.join(data_home(), name)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    icons_path = os.path.join(path, "icons.json") if os.path.isdir(path) else path
    if not os.path.isfile(icons_path):
        raise DataUnavailableError(f"Iconify set {name!r} not found at {icons_path}: {FETCH_HINT}")
    data = _load_json(icons_path, f"Iconify {name} icons.json")
    info = _maybe_json(os.path.join(folder, "info.json"))
    meta = _maybe_json(os.path.join(folder, "metadata.json"))
    if mono is None:
        mono = not info.get("palette", False)
    if emoji is None:
        emoji = str(info.get("category", "")).lower() == "emoji"
    default_w, default_h = data.get("width", 16), data.get("height", 16)
    category_of = {icon: cat for cat, members in (meta.get("categories") or {}).items() for icon in members}
    aliases: dict[str, list[str]] = {}
    for alias, spec in (data.get("aliases") or {}).items():
        if isinstance(spec, dict) and spec.get("parent") and len(spec) == 1:  # plain renames only
            aliases.setdefault(spec["parent"], []).append(alias)

    icons = {k: v for k, v in data.get("icons", {}).items() if include_hidden or not v.get("hidden")}
    col = _Collector(name, render_dir, size)
    col.counts["hidden_dropped"] = len(data.get("icons", {})) - len(icons)
    chosen: dict[str, str] = {}  # base name -> icon kept
    for icon in sorted(icons):
        base = _SKIN_TONE.sub("", icon) if emoji else icon
        if base not in chosen or icon == base:
            chosen[base] = icon
    col.counts["skin_tone_variants_dropped"] = len(icons) - len(chosen)
    known = set(icons)
    for base, icon in sorted(chosen.items()):
        spec = icons[icon]
        category_raw = category_of.get(icon) or category_of.get(base)
        category = _phrase(category_raw) if category_raw else None
        is_flag = (category_raw or "").lower() == "flags"
        words = _emoji_words(base, is_flag) if emoji else name_words(base, known, drop_version=False)
        alias_words = [_emoji_words(a, is_flag) if emoji else name_words(a) for a in aliases.get(icon, [])]
        caption = words
        image_id = f"{name}/{base}"
        more = list(alias_words)
        if emoji and words.startswith("flag of "):
            more += [f"{words[len('flag of '):]} flag"]
        aug = _augment(image_id, caption, words, alias_words, category, more=more,
                       noun="emoji" if emoji else "icon")
        svg = iconify_svg(spec["body"], spec.get("width", default_w), spec.get("height", default_h),
                          spec.get("left", data.get("left", 0)), spec.get("top", data.get("top", 0)))
        col.add(dict(image_id=image_id, captions=(caption,),
                     group=category_raw or next((w for w in reversed(words.split()) if not w.isdigit()),
                                                words.split()[-1]),
                     aug_captions=aug, split_key=f"emoji/{base}" if emoji else None),
                rel=base, mono=mono, svg_text=svg)
    return col.finish(processes, progress, report)


def _maybe_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def read_game_icons(json_path: str | None = None, **kwargs) -> list[Sample]:
    """game-icons.net silhouettes (`@iconify-json/game-icons`), names only."""
    return read_iconify(json_path, name="game-icons", **kwargs)


def read_twemoji(json_path: str | None = None, **kwargs) -> list[Sample]:
    """Twitter's colour emoji (`@iconify-json/twemoji`)."""
    return read_iconify(json_path, name="twemoji", **kwargs)


def read_noto_emoji(json_path: str | None = None, **kwargs) -> list[Sample]:
    """Google's Noto colour emoji (`@iconify-json/noto`)."""
    return read_iconify(json_path, name="noto", **kwargs)

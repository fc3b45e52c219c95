"""Openclipart (Debian `openclipart-png` + `openclipart-svg`) as captioned samples.

Each real PNG under `<root>/png/<category>/...` has an SVG at the same relative stem under
`<root>/svg/`; its RDF metadata gives the caption. Symlinked PNGs (the packaging's
de-duplication: same bytes, often in another folder) are folded into their target.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections import Counter, defaultdict

from data.errors import DataUnavailableError
from data.readers import _clipart_text as ct
from data.readers._svg_meta import SvgMeta, parse_metadata, read_metadata_head
from data.records import Sample

log = logging.getLogger("data.readers.openclipart")

DEFAULT_ROOT = "/usr/share/openclipart"
INSTALL_HINT = (
    "sudo apt-get install openclipart-png openclipart-svg "
    "(or set data.reader.root=... to a folder holding png/ and svg/)"
)


def _scan(png_root: str, dedupe_symlinks: bool = True) -> tuple[list[str], int]:
    """PNG paths relative to png_root (sorted), one per real file, and how many symlinks
    were folded into a file already listed. A link whose target is outside the tree is kept
    once under the link's name; dangling links are skipped."""
    rels: list[str] = []
    reals: set[str] = set()
    links: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(png_root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(".png"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, png_root)
            if os.path.islink(path):
                links.append((rel, os.path.realpath(path)))
            else:
                reals.add(path)  # png_root is resolved and os.walk does not follow links
                rels.append(rel)
    dups = 0
    for rel, real in links:
        if not os.path.isfile(real):
            continue
        if dedupe_symlinks and real in reals:
            dups += 1
            continue
        reals.add(real)
        rels.append(rel)
    return sorted(rels), dups


def _author_signatures(rels: list[str], creator_toks: list[list[str]], vocab: set[str]) -> set[str]:
    """Stem tokens an author puts in many of their file names ("ganson" in 129 of Gerald G.'s
    399): a signature, not content (unless the metadata uses the word too)."""
    files: Counter = Counter()
    per: dict[str, Counter] = defaultdict(Counter)
    for rel, c in zip(rels, creator_toks):
        key = " ".join(c)
        files[key] += 1
        per[key].update(set(ct.tokens(os.path.basename(rel)[:-4])))
    return {t for key, cnt in per.items() if files[key] >= 4
            for t, k in cnt.items() if k >= 0.25 * files[key] and t not in vocab}


def read_openclipart(
    root: str = DEFAULT_ROOT,
    report: dict | None = None,
    max_keywords: int = 5,
    collection_min_count: int = 20,
    dedupe_symlinks: bool = True,
    caption_style: str = "clean",
) -> list[Sample]:
    """One Sample per real PNG, captioned from its SVG's metadata.

    Caption = "<title>, <kw>, <kw>, ..." with up to `max_keywords` cleaned keywords, the
    most specific first. Titles that are collection/theme names (by pattern, or shared by
    more than `collection_min_count` images), author credits or file-like junk are dropped;
    then the words of the file stem (author suffix removed) stand in, then a short
    description, then keywords alone; images with none of these are dropped. A title shared
    by a few images gets the file-stem words that tell them apart. The star-polygon and
    playing-card series get names decoded from their file stems. `aug_captions` holds other
    phrasings (title alone, keywords alone, title + random keyword subsets, description,
    file-stem words), deterministic per image. `group` is the top-level category folder.
    image_id is the PNG path relative to `<root>/png`. Counts go into `report` (if given)
    and the log at INFO. Nothing is cached on disk; the full set takes about 2 s.

    `caption_style="raw"` skips all cleaning: caption = the SVG title as written (else its
    keywords). It exists to reproduce measurements made on the uncleaned metadata, where
    collection names shared by hundreds of images make many queries trivially easy.
    """
    if caption_style not in ("clean", "raw"):
        raise ValueError(f"caption_style must be 'clean' or 'raw', got {caption_style!r}")
    root = os.path.realpath(os.path.expanduser(os.fspath(root)))
    png_root, svg_root = os.path.join(root, "png"), os.path.join(root, "svg")
    if not (os.path.isdir(png_root) and os.path.isdir(svg_root)):
        raise DataUnavailableError(
            f"Openclipart not found at {root} (need png/ and svg/): {INSTALL_HINT}")
    rels, dups = _scan(png_root, dedupe_symlinks)
    if not rels:
        raise DataUnavailableError(f"Openclipart at {root} has no PNG files: {INSTALL_HINT}")

    metas: list[SvgMeta] = []
    svg_missing = 0
    for rel in rels:
        svg = os.path.join(svg_root, rel[:-4] + ".svg")
        try:
            metas.append(parse_metadata(read_metadata_head(svg)))
        except OSError:
            svg_missing += 1
            metas.append(SvgMeta())

    title_counts = Counter(ct.norm_key(m.title) for m in metas)
    desc_counts = Counter(ct.norm_key(m.description) for m in metas)
    creator_toks = [ct.tokens(m.creator) for m in metas]
    known_creators = {ct.fold(ct.norm_key(m.creator)) for m in metas if m.creator} | {
        ct.fold(" ".join(c)) for c in creator_toks if c}
    multi_creators = [list(t) for t in sorted({tuple(ct.fold(x) for x in c) for c in creator_toks
                                                if len(c) >= 2})]
    kw_lists = [ct.clean_keywords(m.keywords, c, known_creators) for m, c in zip(metas, creator_toks)]
    df = Counter(k for kws in kw_lists for k in kws)
    # Words the metadata uses somewhere, minus people's names: file-stem words outside it are
    # mostly author remnants ("ganson") or truncations ("celebrit"), unsafe to append.
    name_toks = {ct.fold(t) for c in creator_toks for t in c}
    vocab = {t for m in metas for t in ct.tokens(f"{m.title} {m.description} {' '.join(m.keywords)}")}
    vocab = {t for t in vocab if ct.fold(t) not in name_toks}
    signatures = _author_signatures(rels, creator_toks, vocab)
    name_prefixes = {n[:i] for n in name_toks for i in range(3, len(n) + 1)}

    def safe_words(words: str, stem: str) -> list[str]:
        """Stem words that are safe to add: known to the metadata, or plausibly real words
        (not a per-author signature like "ganson", not a prefix of a person's name, and not
        the last word of a stem the packaging cut at 24 characters)."""
        toks = ct.tokens(words)
        base = re.sub(r"(?:_0\d+[a-z]?|_r|_)$", "", stem.lower())
        cut = len(base) >= 23 and toks and base.endswith(toks[-1])
        return [t for i, t in enumerate(toks) if t in vocab or (
            len(t) >= 4 and t not in signatures and not (cut and i == len(toks) - 1)
            and ct.fold(t) not in name_prefixes)]

    common = max(2, int(0.05 * len(metas)))

    def rank(k: str) -> tuple[int, int]:
        """Specific-but-shared keywords first (rarest first), then one-offs (often
        misspellings or other languages), then the very common ones."""
        n = df[k]
        return (0 if 2 <= n <= common else 1 if n < 2 else 2, n)

    counts: Counter = Counter()
    samples: list[Sample] = []
    for rel, meta, ctoks, kws in zip(rels, metas, creator_toks, kw_lists):
        stem = os.path.basename(rel)[:-4]
        if caption_style == "raw":
            raw = meta.title.strip() or ", ".join(meta.keywords[:max_keywords])
            if raw:
                samples.append(Sample(image_id=rel, image_path=os.path.join(png_root, rel), captions=(raw,),
                                      group=rel.split(os.sep, 1)[0] if os.sep in rel else None))
            continue
        title, why = ct.clean_title(meta.title, ctoks, known_creators,
                                    title_counts[ct.norm_key(meta.title)], collection_min_count)
        if title is None:
            counts["titles_junk_dropped"] += 1
            counts[f"title_dropped_{why}"] += 1
        else:
            counts["titles_kept"] += 1
            counts["titles_normalized"] += why == "normalized"
        desc = ct.good_description(meta.description, title,
                                   desc_counts[ct.norm_key(meta.description)], collection_min_count)
        words = ct.words_of(stem, ctoks, multi_creators)
        words = words if ct.looks_like_words(words) else ""
        special = ct.special_phrase(stem, rel) if title is None else None
        extra: list[str] = []
        if special:
            primary, extra = special
            source = "series"
        elif title:
            primary, source = title, "title"
            shared = title_counts[ct.norm_key(meta.title)] > 1
            ok = set(safe_words(words, stem)) if shared and words else set()
            more = [t for t in ct.new_words(words, title) if t in ok]
            if more:
                # A title shared by a series ("Sallite", "Chess pieces"): the file name
                # tells the members apart ("set top box", "bishop").
                primary = f"{title}, {' '.join(more)}"
                counts["titles_extended_from_filename"] += 1
        elif words:
            primary, source = words, "filename"
        elif desc:
            primary, source = desc, "description"
        else:
            primary, source = "", "keywords"
        if primary:
            have = ct.said(primary)
            kws = [k for k in kws if ct.new_words(k, have)]
        kws = sorted(kws, key=rank)
        top = kws[:max_keywords]
        if not primary and not top:
            counts["dropped_no_caption"] += 1
            continue
        caption = ", ".join([primary] + top) if primary else ", ".join(top)
        counts[f"captions_from_{source}"] += 1

        rng = random.Random(rel)
        aug = list(extra)
        if primary and top:
            aug += [primary, ", ".join(top)]
        if primary and len(kws) >= 2:
            for _ in range(2):
                sub = rng.sample(kws, rng.randint(1, min(3, len(kws))))
                aug.append(", ".join([primary] + sub))
        if desc and desc != primary:
            aug.append(desc)
        if (words and source != "series"
                and set(ct.new_words(words, caption)) & set(safe_words(words, stem))):
            aug.append(words)
        aug = list(dict.fromkeys(a for a in aug if a and a != caption))
        samples.append(Sample(
            image_id=rel,
            image_path=os.path.join(png_root, rel),
            captions=(caption,),
            group=rel.split(os.sep, 1)[0] if os.sep in rel else None,
            aug_captions=tuple(aug),
        ))

    counts["images"] = len(samples)
    counts["png_files_listed"] = len(rels)
    counts["symlink_duplicates"] = dups
    counts["svg_missing"] = svg_missing
    counts["distinct_captions"] = len({s.captions[0] for s in samples})
    stats = dict(sorted(counts.items()))
    if report is not None:
        report.update(stats)
    log.info("openclipart %s: %s", root, stats)
    return samples

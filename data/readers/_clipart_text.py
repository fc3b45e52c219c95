"""Text cleaning for Openclipart captions: titles, keywords, descriptions and file stems."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

_WORD = re.compile(r"[^\W\d_]+|\d+", re.U)
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_EXT = re.compile(r"\.(?:svg|png|jpe?g|gif|py)\b", re.I)
_URL_OR_MAIL = re.compile(r"https?:|www\.|\S@\S|\.(?:com|org|net|fr|ch)\b", re.I)
_MOJIBAKE = re.compile(r"[\x80-\x9f\ufffd]")
_HASH = re.compile(r"^(?:hash\(|0x[0-9a-f]+$)", re.I)

# Titles that name a collection, theme, submission or author rather than the picture.
_JUNK_TITLE = re.compile(
    r"\bcollection\b|\btheme\b|\bicon ?set\b|\bicons$|\bclip ?arts?\b|\bs[iu]bmission\b"
    r"|open ?clip ?art|^part of\b|^various\b|^untitled\b|^unnamed\b|^new document\b"
    r"|^(?:image|drawing|picture|svg|icon|layer ?\d*|gramastar|test|sample)$",
    re.I,
)
# "Clipart by <author> - <subject>": the subject is right when the title is (nearly) unique,
# but a stale copy-paste when many files share it ("... - bee" on an umbrella).
_CLIPART_BY = re.compile(r"^clip ?art by .+? - (.+)$", re.I)
_BW = re.compile(r"\(\s*b\s*(?:and|&|/)\s*w\s*\)|\bb&w\b", re.I)
_PARENS = re.compile(r"\(([^()]*)\)")

JUNK_KEYWORDS = frozenset({
    "unsorted", "clip art", "clipart", "clip-art", "png", "svg", "media", "public domain",
    "publicdomain", "image", "images", "picture", "hash", "magick", "theme", "themes",
    "lemon theme icon", "icons theme", "signs and symbols", "openclipart", "open clip art",
    "open clip art library", "ocal", "inkscape", "drawing", "vector", "misc", "other", "stuff",
    "various", "none", "new", "united nations member",
})
KEYWORD_MAP = {
    "mapsym": "map symbol", "networksym": "network symbol", "roadsign": "road sign",
    "signalflag": "signal flag", "bodypart": "body part", "stickmen": "stick figure",
    "mimetypes": "file type", "mime types": "file type", "appicon": "application icon",
    "unitedstates": "united states", "musicstuff": "music", "icecream": "ice cream",
    "vegitable": "vegetable", "fatherchristmas": "father christmas", "arrowshape": "arrow",
    "headohones": "headphones", "gameboypocket": "gameboy pocket", "cdplayer": "cd player",
}
# File-stem tokens that are collection prefixes or packaging noise (dropped unless alone).
_STEM_NOISE = frozenset("gnome stock fs aiga ooo im x alt".split())
_STEM_MAP = {"bw": "black and white", "bn": "black and white", "mime": "file"}


def norm_key(text: str) -> str:
    return " ".join(text.lower().split())


@lru_cache(maxsize=1 << 16)
def fold(text: str) -> str:
    """Lower case without accents, for matching author names ("Gonéri" ~ "goneri")."""
    if text.isascii():
        return text.lower()
    return "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))


def tokens(text: str) -> list[str]:
    """Lower-case word and number tokens; camelCase and letter/digit runs are split."""
    return [t.lower() for t in _WORD.findall(_CAMEL.sub(" ", text))]


def looks_like_words(text: str) -> bool:
    """At least one word of 3+ letters, and mostly letters rather than digits/codes."""
    toks = tokens(text)
    letters = sum(len(t) for t in toks if t.isalpha())
    total = sum(len(t) for t in toks)
    return bool(total) and letters >= 0.5 * total and any(t.isalpha() and len(t) >= 3 for t in toks)


def said(ref: str) -> set[str]:
    """What `ref` already says, for new_words: its tokens (singular) and glued pairs."""
    rt = tokens(ref)
    glued = [a + b for a, b in zip(rt, rt[1:])]
    return {singular(t) for t in rt} | set(glued) | {singular(g) for g in glued}


def new_words(phrase: str, ref: str | set[str]) -> list[str]:
    """Tokens of `phrase` (3+ chars) not already said by `ref`: plural-insensitive, and
    ignoring tokens that just glue ref's words together ("chesspieces")."""
    have = said(ref) if isinstance(ref, str) else ref
    return [t for t in tokens(phrase) if len(t) >= 3 and singular(t) not in have and t not in have]


def singular(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def strip_author(toks: list[str], creator: list[str], known_creators: list[list[str]] = ()) -> list[str]:
    """Drop an author credit at the end of a file stem or title (`full_moon_dan_gerhards`;
    `medicina_dottore_archite` for "Architetto Francesco Rollandin": the packaging truncated
    it), and any run of 2+ tokens of the creator's name elsewhere. Accent-insensitive."""
    ftoks = [fold(t) for t in toks]

    def tail_len(name: list[str], min_chars: int, min_tokens: int) -> int:
        full = fold(" ".join(name))
        for k in range(len(toks) - 1, min_tokens - 1, -1):  # keep at least one token
            tail = " ".join(ftoks[-k:])
            if tail == full or (full.startswith(tail) and (
                    len(tail) >= min_chars or full.startswith(tail + " "))):
                return k
        return 0

    k = tail_len(creator, 3, 1) if creator else 0
    if not k:  # another known author (the file's creator field is sometimes empty)
        heads = set(ftoks[1:-1])  # a 2+ token tail must start with the name's first token
        for name in known_creators:
            if name[0] in heads and (k := tail_len(name, 6, 2)):
                break
    out = toks[:-k] if k else list(toks)
    names = {fold(t) for t in creator}
    if len(names) >= 2:
        i = 0
        while i < len(out) - 1:
            j = i
            while j < len(out) and fold(out[j]) in names:
                j += 1
            if j - i >= 2:
                del out[i:j]
            else:
                i += 1
    return out


def _number_noise(tok: str, last: bool) -> bool:
    """Zero-padded indices (`012`, `0002`) anywhere, short version numbers at the end."""
    return tok.isdigit() and ((len(tok) > 1 and tok[0] == "0") or (last and len(tok) <= 2))


def words_of(name: str, creator: list[str], known_creators: list[list[str]] = ()) -> str:
    """Words of a file stem or file-like title (`Switch_Cisco_3750_2`, `filmPhoto2`,
    `help-books-aj.svg`): extension, packaging suffixes (`_01`, `_r`, trailing `_`), index
    and version numbers, the author's name and collection prefixes dropped; `bw` spelled out."""
    s = _EXT.sub(" ", name)
    s = re.sub(r"(?:[_\-. ]+(?:0\d+[a-z]?|r))+$|[_\-. ]+$", "", s)
    toks = tokens(s)
    while toks and _number_noise(toks[-1], True):
        toks.pop()
    toks = strip_author(toks, creator, known_creators)
    toks = [t for i, t in enumerate(toks) if not _number_noise(t, i == len(toks) - 1)]
    kept = [t for t in toks if t not in _STEM_NOISE]
    toks = kept if any(t.isalpha() for t in kept) else toks
    return " ".join(_STEM_MAP.get(t, t) for t in toks)


_SUITS = {"c": "clubs", "d": "diamonds", "h": "hearts", "s": "spades"}
_RANKS = {"a": "ace", "j": "jack", "q": "queen", "k": "king"}
_STAR = re.compile(r"^star_(\d+)pt(\d+)step$")
_CARD = re.compile(r"^[a-z]+_([cdhs])_(\d+|[ajqk])$")
_JOKER = re.compile(r"^[a-z]+_jk_([br])$")
_CARD_BACK = re.compile(r"^back\d*$")


def special_phrase(stem: str, rel_path: str) -> tuple[str, list[str]] | None:
    """(caption phrase, extra phrasings) decoded from the file stem for two big series whose
    metadata says nothing per image: the `gramastar` star polygons and the playing cards."""
    m = _STAR.match(stem)
    if m:
        n, k = int(m.group(1)), int(m.group(2))
        return f"star polygon with {n} points", [f"{n}-pointed star", f"star polygon {{{n}/{k}}}"]
    if "/cards/" in f"/{rel_path}":
        if m := _CARD.match(stem):
            rank, suit = _RANKS.get(m.group(2), m.group(2)), _SUITS[m.group(1)]
            return f"{rank} of {suit} playing card", [f"{rank} of {suit}", f"playing card, {rank}, {suit}"]
        if m := _JOKER.match(stem):
            colour = "black" if m.group(1) == "b" else "red"
            return f"{colour} joker playing card", ["joker card"]
        if _CARD_BACK.match(stem):
            return "back of a playing card", ["card back"]
    return None


def clean_title(title: str, creator: list[str], known_creators: set[str],
                count: int, max_count: int) -> tuple[str | None, str]:
    """(clean title or None, why). why: 'kept', 'normalized', 'empty', 'collection_frequent'
    (shared by more than max_count images), 'collection_pattern', 'author', 'filelike'."""
    t = title.strip()
    if not t:
        return None, "empty"
    if count > max_count:
        return None, "collection_frequent"
    reason = "kept"
    if m := _CLIPART_BY.match(t):
        if count > 2:
            return None, "collection_pattern"
        t, reason = m.group(1), "normalized"
    if _JUNK_TITLE.search(t) or _URL_OR_MAIL.search(t):
        return None, "collection_pattern"
    if fold(norm_key(t)) in known_creators:
        return None, "author"
    cset = {fold(c) for c in creator}
    t = _BW.sub(" black and white ", t)
    # "(Rollandin Francesco)" and "by Some Author" credits.
    t = _PARENS.sub(lambda m: " " if cset & {fold(x) for x in tokens(m.group(1))} else m.group(0), t)
    t = re.sub(r"\bby\s+(.*)$",
               lambda m: "" if cset & {fold(x) for x in tokens(m.group(1))} else m.group(0), t, flags=re.I)
    if _EXT.search(t) or (" " not in t.strip() and re.search(r"_|[a-z][A-Z]|[^\W\d_]\d", t)):
        t, reason = words_of(t, creator), "normalized"
    else:
        t = re.sub(r"(?<=[^\W\d_])0*\d{1,2}\b", "", t)  # "Tigre04", "wedding rings2"
        toks = tokens(t)
        if len(kept := strip_author(toks, creator)) < len(toks):
            t, reason = " ".join(kept), "normalized"
    t = re.sub(r"\s+", " ", t.replace("_", " ")).strip(" -:,.")
    if not looks_like_words(t):
        return None, "author" if cset & {fold(x) for x in tokens(title)} else "filelike"
    if cset and {fold(x) for x in tokens(title) if len(x) > 2} <= cset | {"by", "and", "the", "of"}:
        return None, "author"
    return t, reason


def clean_keywords(raw: list[str], creator: list[str], known_creators: set[str]) -> list[str]:
    """Lower-cased, mapped, de-junked, de-duplicated (plural-insensitive) keywords."""
    out, seen = [], set()
    cset = {fold(c) for c in creator}
    for k in raw:
        k = norm_key(k.replace("_", " "))
        k = KEYWORD_MAP.get(k, k)
        if (not k or k in JUNK_KEYWORDS or _HASH.search(k) or _URL_OR_MAIL.search(k)
                or _MOJIBAKE.search(k) or not any(c.isalpha() for c in k) or len(k) < 2
                or fold(k) in known_creators or (len(cset) >= 2 and set(fold(k).split()) <= cset)):
            continue
        key = " ".join(singular(w) for w in k.split())
        if key not in seen:
            seen.add(key)
            out.append(k)
    return out


def good_description(desc: str, title: str | None, count: int, max_count: int,
                     max_words: int = 20) -> str | None:
    """A short description that says something about the picture, else None."""
    d = desc.strip()
    if not d or count > max_count or _URL_OR_MAIL.search(d) or _MOJIBAKE.search(d):
        return None
    if len(d.split()) > max_words or not looks_like_words(d):
        return None
    if re.search(r"public domain|converted|collection|part of|created (?:with|by)|inkscape", d, re.I):
        return None
    if title and norm_key(d).strip(".") == norm_key(title):
        return None
    return d

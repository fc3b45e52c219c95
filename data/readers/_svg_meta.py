"""Fast extraction of the Creative Commons / Dublin Core metadata block of an SVG file.

Only the head of the file is read (until `</rdf:RDF>`, 64 KiB at a time, at most 1 MiB):
some Openclipart SVGs are many megabytes of path data after a small metadata block.
Parsing is by regular expressions on that block, which tolerates SVGs whose namespaces are
declared on the root element (so the block alone is not well-formed XML for xml.etree).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

_RDF_END = b"</rdf:RDF>"
_P = r"(?:[\w.-]+:)?"  # any (or no) namespace prefix


def _elem(name: str) -> re.Pattern:
    """`<p:name ...>(text)</p:name>` or `<p:name .../>` (group 1 is None then)."""
    return re.compile(rf"<{_P}{name}\b[^>]*?(?:/>|>(.*?)</{_P}{name}\s*>)", re.S)


_WORK = re.compile(rf"<{_P}Work\b.*?</{_P}Work\s*>", re.S)
_AGENT = re.compile(rf"<{_P}Agent\b(?:[^>]*?/>|.*?</{_P}Agent\s*>)", re.S)
_TITLE, _DESC, _SUBJECT, _CREATOR, _LI = (
    _elem("title"), _elem("description"), _elem("subject"), _elem("creator"), _elem("li"))
_TAGS = re.compile(r"<[^>]*>")
_CDATA = re.compile(r"<!\[CDATA\[(.*?)\]\]>", re.S)
_WS = re.compile(r"\s+")


@dataclass
class SvgMeta:
    title: str = ""
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    creator: str = ""


def read_metadata_head(path: str, chunk: int = 1 << 16, limit: int = 1 << 20) -> str:
    """The start of an SVG file up to and including `</rdf:RDF>` (decoded leniently)."""
    with open(path, "rb") as fh:
        buf = fh.read(chunk)
        while _RDF_END not in buf[-(chunk + len(_RDF_END)):] and len(buf) < limit:
            more = fh.read(chunk)
            if not more:
                break
            buf += more
    end = buf.find(_RDF_END)
    if end >= 0:
        buf = buf[: end + len(_RDF_END)]
    return buf.decode("utf-8", "replace")


def text_of(fragment: str | None) -> str:
    """Plain text of an XML fragment: CDATA kept, tags dropped, entities (even double-escaped
    ones like `&amp;#39;`) decoded, whitespace collapsed."""
    if not fragment:
        return ""
    s = _CDATA.sub(lambda m: html.escape(m.group(1), quote=False), fragment)
    s = _TAGS.sub(" ", s)
    for _ in range(2):
        if "&" not in s:
            break
        s = html.unescape(s)
    return _WS.sub(" ", s).strip()


def parse_metadata(head: str) -> SvgMeta:
    """Title, description, keywords and creator of the (first) cc:Work.

    Only the Work's own dc:title counts: the dc:title elements inside cc:Agent blocks
    (publisher, creator, rights) name people or "Open Clip Art Library".
    """
    m = _WORK.search(head)
    if not m:
        return SvgMeta()
    work = m.group(0)
    creator = ""
    c = _CREATOR.search(work)
    if c and c.group(1):
        t = _TITLE.search(c.group(1))
        creator = text_of(t.group(1)) if t else text_of(c.group(1))
    own = _AGENT.sub(" ", work)
    t, d, s = _TITLE.search(own), _DESC.search(own), _SUBJECT.search(own)
    keywords: list[str] = []
    if s and s.group(1):
        items = [text_of(li.group(1)) for li in _LI.finditer(s.group(1))]
        if not items:  # plain `<dc:subject>a, b</dc:subject>`
            items = [text_of(s.group(1))]
        for item in items:
            keywords.extend(k.strip() for k in re.split(r"[,;]", item) if k.strip())
    return SvgMeta(
        title=text_of(t.group(1)) if t else "",
        description=text_of(d.group(1)) if d else "",
        keywords=keywords,
        creator=creator,
    )

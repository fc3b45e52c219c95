"""SVG -> RGB PNG rendering for the icon and emoji sets, with a render cache on disk.

The rasteriser is resvg (the `resvg-py` binding, a self-contained wheel: no system library).
Every image is rendered once at a fixed size (default 256 px; the model resizes to its input)
into `<render_dir>/<dataset>/<size>/<relative name>.png`; files already there are kept, so a
second read costs only a stat per image. Delete the folder to render again (e.g. after
changing the colour scheme below).

Colour and background vary per image, deterministically (a SHA-1 of the image id seeds a
private `random.Random`), so two runs produce byte-identical files:

* monochrome icons (`mono=True`: drawn in `currentColor` or black) are rendered black on
  transparent, and the darkness x opacity of each pixel becomes a mask that paints a
  foreground colour over a background. About 55% white / off-white backgrounds, 30% light
  tints (any hue), 15% dark backgrounds with a light foreground; the foreground on light
  backgrounds comes from a palette of saturated and dark colours (no yellow: too little
  contrast on white).
* colour emoji (`mono=False`) keep their own colours and are composited over a background:
  40% white, 40% light tints, 20% dark.

The icon is drawn centred with a margin of 6-16% of the side (also per image), keeping its
aspect ratio. Nothing is rotated or flipped (an "arrow left" must stay an arrow left).

An SVG that resvg cannot parse or render is skipped and reported, never fatal: see
`render_jobs`, which renders the missing files with a process pool (2 workers by default)
and a tqdm progress bar.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np
from PIL import Image
from tqdm import tqdm

log = logging.getLogger("data.render")

DEFAULT_SIZE = 256
# Bump when the colour scheme or layout changes, so old caches are not mixed with new ones
# (it salts the per-image hash; cached files themselves are never rewritten).
SCHEME = "v1"

# Foregrounds for light backgrounds: saturated or dark, all readable on white.
DARK_FOREGROUNDS = (
    "#000000", "#1f1f1f", "#37474f", "#0d47a1", "#1565c0", "#283593", "#4a148c", "#6a1b9a",
    "#880e4f", "#ad1457", "#b71c1c", "#c62828", "#d84315", "#e65100", "#bf360c", "#4e342e",
    "#1b5e20", "#2e7d32", "#00695c", "#006064", "#00838f", "#01579b", "#311b92", "#3e2723",
)
# Foregrounds for dark backgrounds.
LIGHT_FOREGROUNDS = (
    "#ffffff", "#f5f5f5", "#fff59d", "#ffe082", "#b3e5fc", "#80deea", "#c8e6c9", "#a5d6a7",
    "#f8bbd0", "#e1bee7", "#ffccbc", "#d7ccc8",
)
WHITE_BACKGROUNDS = ("#ffffff", "#ffffff", "#ffffff", "#fafafa", "#f7f7f2", "#f4f6f8")
DARK_BACKGROUNDS = (
    "#000000", "#121212", "#1e1e1e", "#263238", "#1a237e", "#0d1b2a", "#1b3a2f", "#3e1f47",
    "#4a0e0e", "#212f3d", "#2d2d44", "#102a43",
)


def data_home() -> str:
    """Where fetched datasets live: $SMART_GALLERY_DATA, else ~/.cache/smart-gallery/datasets."""
    return os.path.expanduser(os.environ.get("SMART_GALLERY_DATA")
                              or os.path.join("~", ".cache", "smart-gallery", "datasets"))


def default_render_dir() -> str:
    """The render cache: `<data_home>/rendered`."""
    return os.path.join(data_home(), "rendered")


def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{max(0, min(255, round(c * 255))):02x}" for c in rgb)


def _light_tint(rng: random.Random) -> str:
    h = rng.random()
    s = rng.uniform(0.25, 0.7)
    v = rng.uniform(0.93, 1.0)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    mix = rng.uniform(0.55, 0.8)  # towards white
    return _hex([c + (1 - c) * mix for c in (r, g, b)])


def colour_scheme(key: str, mono: bool) -> dict:
    """Foreground (None for colour images), background and margin for one image, from a hash
    of `key` (the image id): the same key always gives the same scheme."""
    seed = int.from_bytes(hashlib.sha1(f"{SCHEME}:{key}".encode("utf-8")).digest()[:8], "big")
    rng = random.Random(seed)
    u = rng.random()
    margin = rng.uniform(0.06, 0.16)
    if mono:
        bg, kind = _background(rng, u, white_below=0.55, tint_below=0.85)
        fg = rng.choice(LIGHT_FOREGROUNDS if kind == "dark" else DARK_FOREGROUNDS)
    else:
        bg, kind = _background(rng, u, white_below=0.4, tint_below=0.8)
        fg = None
    return {"fg": fg, "bg": bg, "kind": kind, "margin": margin}


def _background(rng: random.Random, u: float, white_below: float, tint_below: float) -> tuple:
    """A white background when u < white_below, a light tint below tint_below, else a dark one."""
    if u < white_below:
        return rng.choice(WHITE_BACKGROUNDS), "white"
    if u < tint_below:
        return _light_tint(rng), "tint"
    return rng.choice(DARK_BACKGROUNDS), "dark"


def _rgb(hex_colour: str) -> np.ndarray:
    h = hex_colour.lstrip("#")
    return np.array([int(h[i:i + 2], 16) for i in (0, 2, 4)], dtype=np.float32)


def iconify_svg(body: str, width: float = 16, height: float = 16, left: float = 0, top: float = 0) -> str:
    """A standalone SVG document from an Iconify JSON icon body and its view box."""
    def num(x: float) -> str:
        return f"{x:g}"
    return (f'<svg xmlns="http://www.w3.org/2000/svg" '
            f'xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{num(left)} {num(top)} {num(width)} {num(height)}">{body}</svg>')


def _rasterise(svg_text: str, width: int) -> Image.Image:
    """RGBA rendering of `svg_text`, `width` pixels wide (height keeps the aspect ratio)."""
    import resvg_py  # imported here so the data package imports without it

    png = resvg_py.svg_to_bytes(svg_string=svg_text, width=width, skip_system_fonts=True)
    image = Image.open(io.BytesIO(bytes(png)))
    image.load()
    return image.convert("RGBA")


def render_svg(svg_text: str, key: str, size: int = DEFAULT_SIZE, mono: bool = True) -> Image.Image:
    """Render one SVG to a `size` x `size` RGB image with the colour scheme of `key`.

    Raises ValueError (from resvg) for an SVG it cannot parse, and ValueError for one that
    renders to nothing (every pixel transparent)."""
    scheme = colour_scheme(key, mono)
    inner = max(8, round(size * (1 - 2 * scheme["margin"])))
    icon = _rasterise(svg_text, inner)
    if icon.height > inner:  # taller than wide: render again so that the height fits
        icon = _rasterise(svg_text, max(1, round(inner * icon.width / icon.height)))
    arr = np.asarray(icon, dtype=np.float32) / 255.0
    alpha = arr[..., 3]
    if not alpha.any():
        raise ValueError("the SVG rendered to an empty (fully transparent) image")
    bg = _rgb(scheme["bg"])
    x0, y0 = (size - icon.width) // 2, (size - icon.height) // 2
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = bg
    region = canvas[y0:y0 + icon.height, x0:x0 + icon.width]
    if mono:
        # Ink = opacity x darkness, so white cut-outs inside an icon show the background.
        lum = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        ink = (alpha * (1.0 - lum))[..., None]
        region[:] = region * (1 - ink) + _rgb(scheme["fg"]) * ink
    else:
        a = alpha[..., None]
        region[:] = region * (1 - a) + arr[..., :3] * 255.0 * a
    return Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")


@dataclass(frozen=True)
class RenderJob:
    """One picture to render: the SVG (a file or its text), the PNG to write, the colour key."""

    key: str
    out_path: str
    svg_path: str | None = None
    svg_text: str | None = None
    mono: bool = True


@dataclass
class RenderReport:
    total: int = 0
    cached: int = 0
    rendered: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, error)
    seconds: float = 0.0

    @property
    def failed_keys(self) -> set[str]:
        return {k for k, _ in self.failed}


def _render_one(args: tuple[RenderJob, int]) -> tuple[str, str | None]:
    job, size = args
    try:
        if job.svg_text is not None:
            text = job.svg_text
        else:
            with open(job.svg_path, encoding="utf-8") as f:
                text = f.read()
        image = render_svg(text, job.key, size, job.mono)
        os.makedirs(os.path.dirname(job.out_path), exist_ok=True)
        tmp = f"{job.out_path}.{os.getpid()}.tmp"
        image.save(tmp, format="PNG", optimize=False, compress_level=6)
        os.replace(tmp, job.out_path)  # never leave a half-written PNG under the real name
        return job.key, None
    except Exception as error:  # noqa: BLE001 - one bad SVG must not stop the set
        return job.key, f"{type(error).__name__}: {error}"[:300]


def render_jobs(jobs: Sequence[RenderJob], size: int = DEFAULT_SIZE, processes: int = 2,
                desc: str = "render", progress: bool = True) -> RenderReport:
    """Render every job whose PNG does not exist yet; failures are reported, not raised.

    Up to `processes` worker processes (a handful of jobs is rendered in this process)."""
    start = time.perf_counter()
    todo = [j for j in jobs if not os.path.exists(j.out_path)]
    report = RenderReport(total=len(jobs), cached=len(jobs) - len(todo))
    if todo:
        try:
            import resvg_py  # noqa: F401
        except ImportError as error:
            raise ModuleNotFoundError(
                "rendering the icon sets needs resvg-py: .venv/bin/pip install resvg-py==0.5.0 "
                "(pinned in pyproject.toml)") from error
        args = [(j, size) for j in todo]
        bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, mininterval=1.0)
        if processes <= 1 or len(todo) < 64:
            results = map(_render_one, args)
            pool = None
        else:
            pool = get_context("fork" if os.name == "posix" else "spawn").Pool(processes)
            results = pool.imap_unordered(_render_one, args, chunksize=16)
        try:
            for key, error in results:
                if error is None:
                    report.rendered += 1
                else:
                    report.failed.append((key, error))
                bar.update(1)
        finally:
            bar.close()
            if pool is not None:
                pool.close()
                pool.join()
    report.failed.sort()
    report.seconds = time.perf_counter() - start
    if report.failed:
        log.warning("%s: %d SVG(s) could not be rendered and are skipped, e.g. %s", desc,
                    len(report.failed), "; ".join(f"{k}: {e}" for k, e in report.failed[:3]))
    return report

"""Figures of an evaluation: recall@K curves, first-relevant rank histograms, the worst-queries sheet.

Matplotlib is used through `Figure` + the Agg canvas directly (no pyplot, no global
backend switch), so this works headless and inside servers. The contact sheet is drawn
with PIL so it stays legible at any number of rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont, ImageOps

from data.images import ImageLoadError, load_image
from evaluation.retrieval import TEXT_TO_IMAGE, EvalResult


_DIRECTION_STYLES = {"text_to_image": "-", "image_to_text": "--", "text_to_image_group": ":"}


def _figure(width: float = 7.0, height: float = 4.5):
    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _recall_axes(axes, title: str) -> None:
    axes.set_xscale("log")
    ticks = [1, 2, 5, 10, 20, 50, 100]
    axes.set_xticks(ticks, [str(t) for t in ticks])
    axes.set_xlim(1, 100)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("K")
    axes.set_ylabel("recall@K (share of queries with a relevant item in the top K)")
    axes.grid(True, which="both", alpha=0.3)
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize="small")


def _k_values(curve: list[float]) -> np.ndarray:
    return np.arange(1, len(curve) + 1)


def plot_recall_at_k(result: EvalResult, path: str | Path) -> Path:
    """Recall@K for K = 1..min(100, candidates), one line per direction."""
    figure, axes = _figure()
    for name, direction in result.directions.items():
        candidates = direction.metrics["num_candidates"]
        axes.plot(_k_values(direction.recall_curve), direction.recall_curve, _DIRECTION_STYLES.get(name, "-"),
                  label=f"{direction.title} ({direction.metrics['num_queries']} queries, {candidates} candidates)")
    _recall_axes(axes, f"Recall@K — {result.dataset or 'data'} / {result.split or '?'} — model {result.model_id}")
    figure.savefig(path)
    return Path(path)


def rank_bins(largest: int) -> tuple[list[int], list[str]]:
    """Bin edges (left-closed) 1, 2, 3, 4, 6, 11, 21, 51, 101, 201, 501, ... covering `largest`, and labels."""
    edges = [1, 2, 3, 4, 6, 11]
    step = 10
    while edges[-1] <= largest:
        for factor in (2, 5, 10):
            edges.append(step * factor + 1)
        step *= 10
    while len(edges) > 2 and edges[-2] > largest:
        edges.pop()
    labels = [str(lo) if hi - lo == 1 else f"{lo}–{hi - 1}" for lo, hi in zip(edges, edges[1:])]
    return edges, labels


def plot_rank_histogram(result: EvalResult, path: str | Path) -> Path:
    """Share of queries whose first relevant item lands in rank bins 1, 2, 3, 4–5, 6–10, ..., per direction."""
    figure, axes = _figure(8.0, 4.5)
    largest = max(int(d.first_ranks.max()) for d in result.directions.values())
    edges, labels = rank_bins(largest)
    positions = np.arange(len(labels))
    width = 0.8 / len(result.directions)
    for number, (name, direction) in enumerate(result.directions.items()):
        ranks = direction.first_ranks[direction.first_ranks > 0].numpy()
        counts, _ = np.histogram(ranks, bins=edges)
        axes.bar(positions + (number - (len(result.directions) - 1) / 2) * width, counts / len(ranks), width,
                 label=f"{direction.title} ({len(ranks)} queries, median rank {direction.metrics['median_rank']:g})")
    axes.set_xticks(positions, labels, rotation=30 if len(labels) > 9 else 0)
    axes.set_xlabel("rank of the first relevant item (1 = top)")
    axes.set_ylabel("share of queries")
    axes.grid(True, axis="y", alpha=0.3)
    candidates = ", ".join(f"{d.title}: {d.metrics['num_candidates']}" for d in result.directions.values())
    axes.set_title(f"First-relevant rank — {result.dataset or 'data'} / {result.split or '?'}\ncandidates: {candidates}",
                   fontsize="medium")
    axes.legend(fontsize="small")
    figure.savefig(path)
    return Path(path)


def plot_comparison(results: Mapping[str, EvalResult], path: str | Path) -> Path:
    """Recall@K curves of several checkpoints on one split: one colour per checkpoint, one style per direction."""
    figure, axes = _figure(8.0, 5.0)
    colours = [f"C{i}" for i in range(10)]
    first = next(iter(results.values()))
    for number, (label, result) in enumerate(results.items()):
        for name, direction in result.directions.items():
            if name == "text_to_image_group":
                continue  # keep the figure readable: the two instance-level directions
            axes.plot(_k_values(direction.recall_curve), direction.recall_curve, _DIRECTION_STYLES.get(name, "-"),
                      color=colours[number % len(colours)],
                      label=f"{label}: {direction.title} (MRR {direction.metrics['MRR']:.3f})")
    candidates = ", ".join(f"{d.title}: {d.metrics['num_candidates']} candidates"
                           for n, d in first.directions.items() if n != "text_to_image_group")
    _recall_axes(axes, f"Recall@K — {first.dataset or 'data'} / {first.split or '?'}\n{candidates}")
    figure.savefig(path)
    return Path(path)


# ---------------------------------------------------------------------------- contact sheet

_GREEN, _RED, _GREY = (30, 150, 60), (200, 40, 40), (150, 150, 150)


def _font(size: int):
    """DejaVu Sans (shipped with matplotlib: wide Unicode coverage), else Pillow's built-in font."""
    try:
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; the last kept line ends with an ellipsis if cut."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if font.getlength(candidate) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    for i, line in enumerate(lines):  # a single word wider than the column
        while font.getlength(line) > width and len(line) > 1:
            line = line[:-2] + "…"
        lines[i] = line
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while font.getlength(last + "…") > width and last:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "…"]
    return lines


def _thumbnail(path: str, size: int) -> Image.Image:
    try:
        image = load_image(path, min_size=size)
    except ImageLoadError:
        return Image.new("RGB", (size, size), (225, 225, 225))
    return ImageOps.pad(image, (size, size), color=(255, 255, 255))


def worst_queries_sheet(result: EvalResult, path: str | Path, count: int = 12, thumb: int = 112) -> Path | None:
    """Contact sheet of the worst text->image queries.

    One row per query: the caption and its first-relevant rank, its top-5 images (green frame:
    carries the caption, red: does not; under each its similarity and its own first caption,
    i.e. what the model took it for), then the expected image (the best-ranked relevant one).
    """
    direction = result.directions[TEXT_TO_IMAGE]
    rows = direction.worst(count)
    if not rows:
        return None
    title_font, text_font, small_font = _font(16), _font(14), _font(11)
    pad, text_width, label_height, header = 10, 250, 34, 74
    top_n = direction.top_indices.shape[1]
    row_height = thumb + label_height + 2 * pad
    gap = 24  # between the top-N block and the expected image
    width = pad + text_width + pad + top_n * (thumb + pad) + gap + thumb + pad
    height = header + len(rows) * row_height + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)

    candidates = direction.metrics["num_candidates"]
    draw.text((pad, 8), f"Worst text → image queries — {result.dataset or 'data'} / {result.split or '?'} — "
              f"model {result.model_id} — {candidates} candidate images", fill="black", font=title_font)
    draw.text((pad, 32), "Frame: green = the image carries the query caption, red = it does not. "
              "Under each image: cosine similarity and the image's own first caption.", fill=_GREY, font=small_font)
    x_images = pad + text_width + pad
    column_y = header - 20
    draw.text((pad, column_y), "query (rank of the first relevant image, AP)", fill=_GREY, font=small_font)
    for i in range(top_n):
        draw.text((x_images + i * (thumb + pad), column_y), f"retrieved #{i + 1}", fill=_GREY, font=small_font)
    x_expected = x_images + top_n * (thumb + pad) + gap
    draw.text((x_expected, column_y), "expected", fill=_GREY, font=small_font)
    draw.line((x_expected - gap // 2, header - 4, x_expected - gap // 2, height - pad), fill=(200, 200, 200))

    thumbs: dict[int, Image.Image] = {}

    def image_at(candidate: int) -> Image.Image:
        if candidate not in thumbs:
            thumbs[candidate] = _thumbnail(result.samples[candidate].image_path, thumb - 6)
        return thumbs[candidate]

    def framed(x: int, y: int, candidate: int, colour, lines: list[str]) -> None:
        draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=colour)
        sheet.paste(image_at(candidate), (x + 3, y + 3))
        for n, line in enumerate(lines[:2]):
            draw.text((x, y + thumb + 3 + n * 14), line, fill="black", font=small_font)

    for number, row in enumerate(rows):
        y = header + number * row_height + pad
        if number:
            draw.line((pad, y - pad // 2, width - pad, y - pad // 2), fill=(220, 220, 220))
        query = direction.query_labels[row]
        caption_index = int(direction.query_indices[row])
        relevant = set(_images_of_caption(result, caption_index))
        rank = int(direction.first_ranks[row])
        text_lines = _wrap(f"“{query}”", text_font, text_width, 5)
        for n, line in enumerate(text_lines):
            draw.text((pad, y + n * 19), line, fill="black", font=text_font)
        draw.text((pad, y + len(text_lines) * 19 + 4),
                  f"rank {rank} of {candidates} · AP {float(direction.average_precision[row]):.3f}"
                  + (f" · {len(relevant)} relevant" if len(relevant) > 1 else ""), fill=_RED, font=small_font)
        for i in range(top_n):
            candidate = int(direction.top_indices[row, i])
            own_caption = result.samples[candidate].captions[0]
            framed(x_images + i * (thumb + pad), y, candidate, _GREEN if candidate in relevant else _RED,
                   [f"{float(direction.top_scores[row, i]):.3f}"] + _wrap(own_caption, small_font, thumb, 1))
        expected = int(direction.best_relevant[row])
        if expected >= 0:
            framed(x_expected, y, expected, _GREEN,
                   [f"rank {rank}"] + _wrap(Path(result.samples[expected].image_id).name, small_font, thumb, 1))
    sheet.save(path, optimize=True)
    return Path(path)


def _images_of_caption(result: EvalResult, caption_index: int) -> list[int]:
    caption = result.captions[caption_index]
    return [i for i, s in enumerate(result.samples) if caption in s.captions]

"""Writing an evaluation's report folder.

    metrics.json        every number (both directions, category level, counts, skipped images)
    report.md           one table per direction + the figures, for people
    per_query.csv       direction, query, rank of the first relevant item, AP (one row per scored query)
    recall_at_k.png     recall@K curves, K = 1..min(100, candidates)
    rank_histogram.png  distribution of the first-relevant rank
    worst_queries.png   contact sheet of the worst text->image queries
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from evaluation import plots
from evaluation.retrieval import DIRECTION_TITLES, IMAGE_TO_TEXT, TEXT_TO_IMAGE, TEXT_TO_IMAGE_GROUP, EvalResult

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
PER_QUERY_FILE = "per_query.csv"
RECALL_PLOT = "recall_at_k.png"
HISTOGRAM_PLOT = "rank_histogram.png"
WORST_SHEET = "worst_queries.png"

# (label in report.md, key in metrics.json) for the metric rows of a direction table.
QUALITY_ROWS = [("MRR", "MRR"), ("MAP", "MAP"), ("median rank", "median_rank"), ("mean rank", "mean_rank"),
                ("chance MRR", "chance_MRR")]

RELEVANCE_NOTES = {
    TEXT_TO_IMAGE: "One query per distinct caption; relevant: every image carrying that exact caption.",
    IMAGE_TO_TEXT: "One query per readable image; relevant: every caption of that image.",
    TEXT_TO_IMAGE_GROUP: ("One query per distinct caption; relevant: every image of the caption's group. "
                          "Captions whose images span several groups (or have none) are skipped."),
}


def format_value(key: str, value) -> str:
    """How a metric is printed in the markdown tables (and parsed back by the tests)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int) or key.startswith("num_") or key.endswith("_queries"):
        return str(int(value))
    if key in ("median_rank", "mean_rank"):
        return f"{value:.2f}"
    return f"{value:.4f}"


def direction_rows(result: EvalResult, name: str) -> list[tuple[str, str]]:
    """(label, formatted value) rows of one direction's table."""
    metrics = result.directions[name].metrics
    rows = [
        ("direction", DIRECTION_TITLES[name]),
        ("split", str(result.split)),
        ("queries", format_value("num_queries", metrics["num_queries"])),
        ("candidates", format_value("num_candidates", metrics["num_candidates"])),
        ("skipped queries", format_value("skipped_queries", metrics["skipped_queries"])),
        ("model id", f"`{result.model_id}`"),
        ("checkpoint", f"`{result.checkpoint}`"),
    ]
    rows += [(f"R@{k}", format_value(f"R@{k}", metrics[f"R@{k}"])) for k in result.ks]
    rows += [(label, format_value(key, metrics[key])) for label, key in QUALITY_ROWS]
    if "per_pair_MRR" in metrics:
        rows += [("queries, one per (image, caption) pair", format_value("num_queries", metrics["per_pair_queries"]))]
        rows += [(f"R@{k}, per pair", format_value(f"R@{k}", metrics[f"per_pair_R@{k}"])) for k in result.ks]
        rows += [("MRR, per pair", format_value("MRR", metrics["per_pair_MRR"]))]
    if name == TEXT_TO_IMAGE_GROUP:
        rows += [("groups", str(metrics["num_groups"])),
                 ("ambiguous queries", str(metrics["ambiguous_queries"])),
                 ("ungrouped queries", str(metrics["ungrouped_queries"]))]
    return rows


def markdown_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_metrics_json(result: EvalResult, path: Path) -> Path:
    path.write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    return path


def write_per_query_csv(result: EvalResult, path: Path) -> Path:
    """One row per scored query (skipped queries, which have no rank, are left out)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["direction", "query_index", "query", "num_relevant", "first_relevant_rank",
                         "average_precision", "top1"])
        for name, direction in result.directions.items():
            for row in (direction.first_ranks > 0).nonzero().squeeze(1).tolist():
                writer.writerow([
                    name, int(direction.query_indices[row]), direction.query_labels[row],
                    int(direction.num_relevant[row]), int(direction.first_ranks[row]),
                    f"{float(direction.average_precision[row]):.6f}",
                    direction.candidate_labels[int(direction.top_indices[row, 0])],
                ])
    return path


def report_markdown(result: EvalResult, figures: dict[str, Path], worst_queries: int) -> str:
    lines = [
        f"# Retrieval evaluation — {result.dataset} / {result.split}",
        "",
        f"- model id: `{result.model_id}`",
        f"- checkpoint: `{result.checkpoint}`",
        f"- dataset: {result.dataset}, split: {result.split}",
        f"- images: {len(result.samples)} evaluated of {result.num_split_images} in the split"
        + (f", {len(result.skipped_images)} unreadable and skipped (listed in {METRICS_FILE})"
           if result.skipped_images else ""),
        f"- distinct captions: {len(result.captions)}",
    ]
    if result.max_queries:
        lines.append(f"- at most {result.max_queries} queries per direction (seeded random subset), "
                     "ranked against every candidate")
    for name in result.directions:
        lines += ["", f"## {DIRECTION_TITLES[name]}", "", RELEVANCE_NOTES[name], "",
                  markdown_table(["metric", "value"], [list(r) for r in direction_rows(result, name)], ["---", "---:"])]
    if figures:
        lines += ["", "## Figures", ""]
        for label, key in (("Recall@K", RECALL_PLOT), ("Rank of the first relevant item", HISTOGRAM_PLOT)):
            if key in figures:
                lines += [f"![{label}]({key})", ""]
    worst = result.directions[TEXT_TO_IMAGE].worst(worst_queries)
    if worst:
        t2i = result.directions[TEXT_TO_IMAGE]
        lines += ["", f"## Worst {len(worst)} text → image queries", ""]
        if WORST_SHEET in figures:
            lines += [f"![Worst text → image queries]({WORST_SHEET})", "",
                      "Each row: the query, its top-5 images (green: carries the caption) and the expected image.",
                      ""]
        rows = [[str(int(t2i.first_ranks[r])), f"{float(t2i.average_precision[r]):.3f}", t2i.query_labels[r],
                 " ".join(f"“{result.samples[int(i)].captions[0]}”" for i in t2i.top_indices[r, :3])] for r in worst]
        lines.append(markdown_table(["rank", "AP", "query", "top 3 retrieved (their first caption)"], rows,
                                    ["---:", "---:", "---", "---"]))
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def write_report(result: EvalResult, output_dir: str | Path, worst_queries: int = 12,
                 figures: bool = True) -> dict[str, Path]:
    """Write the report folder; returns {file name: path} of what was written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = {METRICS_FILE: write_metrics_json(result, output_dir / METRICS_FILE),
               PER_QUERY_FILE: write_per_query_csv(result, output_dir / PER_QUERY_FILE)}
    if figures:
        written[RECALL_PLOT] = plots.plot_recall_at_k(result, output_dir / RECALL_PLOT)
        written[HISTOGRAM_PLOT] = plots.plot_rank_histogram(result, output_dir / HISTOGRAM_PLOT)
        if worst_queries > 0:
            sheet = plots.worst_queries_sheet(result, output_dir / WORST_SHEET, worst_queries)
            if sheet is not None:
                written[WORST_SHEET] = sheet
    report = output_dir / REPORT_FILE
    report.write_text(report_markdown(result, written, worst_queries), encoding="utf-8")
    written[REPORT_FILE] = report
    return written

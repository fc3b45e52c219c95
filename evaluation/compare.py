"""Compare checkpoints on one split: `python -m evaluation.compare checkpoints=[A,B] names=[a,b] data=... split=test`.

Every checkpoint is evaluated with the same function as `evaluation.evaluate` on the same
samples (each embeds the split's images once, for both directions). Writes into output_dir:

    comparison.md     one side-by-side table (a column per checkpoint; best value in bold;
                      a Δ column when there are exactly two)
    comparison.json   every checkpoint's metrics.json content, in order
    recall_at_k.png   recall@K curves of all checkpoints
    <name>/           each checkpoint's full report (per_checkpoint_reports=true)

The main use: the heads-only baseline against a fine-tuned run,
    python -m evaluation.compare checkpoints=[runs/heads/best,runs/finetune/best] names=[heads,finetune]
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import hydra
from omegaconf import DictConfig

from evaluation import plots
from evaluation.cli import (CliError, as_list, configure_torch, data_config, evaluation_kwargs, expected_errors,
                            load, load_split)
from evaluation.report import format_value, markdown_table, write_report
from evaluation.retrieval import DIRECTION_TITLES, EvalResult, evaluate_checkpoint
from training.checkpoint import read_checkpoint_config

log = logging.getLogger("evaluation")

COMPARISON_MD = "comparison.md"
COMPARISON_JSON = "comparison.json"
COMPARISON_PLOT = "recall_at_k.png"
LOWER_IS_BETTER = {"median_rank", "mean_rank"}


def default_names(paths: list[str]) -> list[str]:
    """`run/best` for a training run's best/ or last/ folder, else the folder name; made unique."""
    names = []
    for path in paths:
        p = Path(path).expanduser().resolve()
        name = f"{p.parent.name}/{p.name}" if p.name in ("best", "last") and p.parent.name else p.name
        names.append(name or str(path))
    return unique(names)


def unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "checkpoint"


def metric_keys(ks) -> list[tuple[str, str]]:
    return [(f"R@{k}", f"R@{k}") for k in ks] + [
        ("MRR", "MRR"), ("MAP", "MAP"), ("median rank", "median_rank"), ("mean rank", "mean_rank")]


def comparison_markdown(results: Mapping[str, EvalResult], reports: Mapping[str, str] | None = None) -> str:
    names = list(results)
    first = results[names[0]]
    delta = len(names) == 2
    lines = [f"# Checkpoint comparison — {first.dataset} / {first.split}", ""]
    reports = reports or {}
    lines.append(markdown_table(
        ["name", "model id", "checkpoint", "images evaluated", "skipped images", "full report"],
        [[name, f"`{r.model_id}`", f"`{r.checkpoint}`", str(len(r.samples)), str(len(r.skipped_images)),
          f"[{reports[name]}/report.md]({reports[name]}/report.md)" if name in reports else "–"]
         for name, r in results.items()]))
    header = ["metric"] + names + ([f"Δ ({names[1]} − {names[0]})"] if delta else [])
    rows = []
    directions = [d for d in first.directions if all(d in r.directions for r in results.values())]
    for direction in directions:
        sizes = [f"{r.directions[direction].metrics['num_queries']} × {r.directions[direction].metrics['num_candidates']}"
                 for r in results.values()]
        rows.append([f"**{DIRECTION_TITLES[direction]}** (queries × candidates)"] + sizes + ([""] if delta else []))
        for label, key in metric_keys(first.ks):
            values = [r.directions[direction].metrics[key] for r in results.values()]
            best = min(values) if key in LOWER_IS_BETTER else max(values)
            cells = [f"**{format_value(key, v)}**" if len(values) > 1 and v == best else format_value(key, v)
                     for v in values]
            if delta:
                cells.append(f"{values[1] - values[0]:+.4f}" if key not in LOWER_IS_BETTER
                             else f"{values[1] - values[0]:+.2f}")
            rows.append([label] + cells)
    lines += ["", f"Split `{first.split}` of {first.dataset}; best value per row in bold "
              "(higher is better, except ranks).", "",
              markdown_table(header, rows, ["---"] + ["---:"] * (len(header) - 1)), "",
              f"![Recall@K of every checkpoint]({COMPARISON_PLOT})"]
    notes = comparison_notes(results)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def comparison_notes(results: Mapping[str, EvalResult]) -> list[str]:
    notes = []
    pools = {name: (len(r.samples), len(r.captions)) for name, r in results.items()}
    if len(set(pools.values())) > 1:
        notes.append(f"the checkpoints were scored on different pools (images, captions): {pools}; "
                     "their figures are not directly comparable")
    ids = [r.model_id for r in results.values()]
    if len(set(ids)) < len(ids):
        notes.append("some checkpoints have the same model id (identical weights)")
    return notes


def write_comparison(results: Mapping[str, EvalResult], output_dir: str | Path,
                     reports: Mapping[str, str] | None = None) -> dict[str, Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()))
    payload = {
        "dataset": first.dataset, "split": first.split, "ks": list(first.ks),
        "checkpoints": [{"name": name, "report": (reports or {}).get(name), **result.to_dict()}
                        for name, result in results.items()],
        "notes": comparison_notes(results),
    }
    written = {COMPARISON_JSON: output_dir / COMPARISON_JSON, COMPARISON_MD: output_dir / COMPARISON_MD}
    written[COMPARISON_JSON].write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    written[COMPARISON_PLOT] = plots.plot_comparison(results, output_dir / COMPARISON_PLOT)
    written[COMPARISON_MD].write_text(comparison_markdown(results, reports), encoding="utf-8")
    return written


@hydra.main(version_base="1.3", config_path="../configs", config_name="compare")
def main(cfg: DictConfig) -> None:
    output_dir = Path(str(cfg.output_dir))
    with expected_errors():
        configure_torch(cfg)
        paths = as_list(cfg.checkpoints)
        if not paths:
            raise CliError("checkpoints=[A,B,...] needs at least one checkpoint directory")
        names = as_list(cfg.names) or default_names(paths)
        if len(names) != len(paths):
            raise CliError(f"names has {len(names)} entries for {len(paths)} checkpoints")
        names = unique(names)
        kwargs = evaluation_kwargs(cfg)
        for path in paths:  # fail before any slow work when one of them is not a checkpoint
            read_checkpoint_config(path)
        samples, dataset = load_split(cfg)
        results: dict[str, EvalResult] = {}
        for name, path in zip(names, paths):
            log.info("evaluating %s (%s)", name, path)
            checkpoint = load(cfg, path)
            results[name] = evaluate_checkpoint(checkpoint, samples, dataset=dataset, split=str(cfg.split),
                                                data_config=data_config(cfg), **kwargs)
            del checkpoint
    reports = {}
    if cfg.per_checkpoint_reports:
        for (name, result), folder in zip(results.items(), unique([folder_name(n) for n in results])):
            write_report(result, output_dir / folder, worst_queries=int(cfg.worst_queries))
            reports[name] = folder
    written = write_comparison(results, output_dir, reports)
    log.info("\n%s", written[COMPARISON_MD].read_text())
    log.info("comparison: %s", written[COMPARISON_MD])


if __name__ == "__main__":
    main()

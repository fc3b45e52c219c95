"""Evaluate one checkpoint: `python -m evaluation.evaluate checkpoint=PATH data=... split=test`.

Every option is a Hydra override of configs/eval.yaml, e.g.

    python -m evaluation.evaluate checkpoint=outputs/train/RUN/best                  # Openclipart test split
    python -m evaluation.evaluate checkpoint=CKPT data=captions_csv data.csv=/data/captions.csv split=all
    python -m evaluation.evaluate checkpoint=CKPT max_queries=2000 output_dir=reports/mine

It reports text->image and image->text retrieval (plus category-level text->image when the
data has groups) into `output_dir`: metrics.json, report.md, per_query.csv, recall_at_k.png,
rank_histogram.png, worst_queries.png (see evaluation.report).

From Python:

    from training.checkpoint import load_checkpoint
    from evaluation.evaluate import evaluate_checkpoint, write_report
    result = evaluate_checkpoint(load_checkpoint(path), samples, dataset="mine", split="test")
    write_report(result, "reports/mine")
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from evaluation.cli import configure_torch, data_config, evaluation_kwargs, expected_errors, load, load_split
from evaluation.report import REPORT_FILE, write_report
from evaluation.retrieval import DIRECTION_TITLES, EvalResult, evaluate_checkpoint

__all__ = ["evaluate_checkpoint", "write_report", "EvalResult", "main"]

log = logging.getLogger("evaluation")


def summary_lines(result: EvalResult) -> list[str]:
    lines = []
    for name, direction in result.directions.items():
        m = direction.metrics
        recalls = "  ".join(f"R@{k} {m[f'R@{k}']:.3f}" for k in result.ks)
        lines.append(f"{DIRECTION_TITLES[name]:<30} {m['num_queries']:>6} queries x {m['num_candidates']:>6} candidates"
                     f"  {recalls}  MRR {m['MRR']:.3f}  MAP {m['MAP']:.3f}  median rank {m['median_rank']:g}")
    return lines


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> float:
    with expected_errors():
        configure_torch(cfg)
        checkpoint_path = str(cfg.checkpoint)
        output_dir = str(cfg.output_dir)
        kwargs = evaluation_kwargs(cfg)
        checkpoint = load(cfg, checkpoint_path)
        samples, dataset = load_split(cfg)
        result = evaluate_checkpoint(checkpoint, samples, dataset=dataset, split=str(cfg.split),
                                     data_config=data_config(cfg), **kwargs)
    written = write_report(result, output_dir, worst_queries=int(cfg.worst_queries), figures=bool(cfg.figures))
    for line in summary_lines(result):
        log.info("%s", line)
    if result.skipped_images:
        log.warning("%d unreadable images skipped (see metrics.json)", len(result.skipped_images))
    log.info("report: %s", written[REPORT_FILE])
    return result.directions["text_to_image"].metrics["MRR"]


if __name__ == "__main__":
    main()

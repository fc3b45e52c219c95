"""The evaluation CLIs (evaluate, compare) end to end on tiny checkpoints, and the scoring on known embeddings."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONFIG_DIR
from data.fixtures import make_shapes_dataset
from data.records import Sample
from data.transforms import Preprocessing
from evaluation.cli import CliError, load_split
from evaluation.relevance import CaptionPool
from evaluation.retrieval import chance_mrr, evaluate_embeddings
from training.checkpoint import save_checkpoint
from training.model import build_model

REPO = Path(__file__).resolve().parents[1]
CORRUPT = "images/corrupt.jpg"
REPORT_FILES = ["metrics.json", "report.md", "per_query.csv", "recall_at_k.png", "rank_histogram.png",
                "worst_queries.png"]
TITLES = {"text_to_image": "text → image", "image_to_text": "image → text",
          "text_to_image_group": "text → image (category level)"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """24 shapes + a corrupt file + a copy of image 0 whose captions cross groups."""
    root = tmp_path_factory.mktemp("eval_shapes")
    csv_path = make_shapes_dataset(root, count=24, size=32, seed=0)
    (root / CORRUPT).write_bytes(b"not an image at all")
    shutil.copy(root / "images/0000_red_circle.png", root / "images/extra.png")
    with csv_path.open("a", newline="") as handle:
        csv.writer(handle).writerows([
            (CORRUPT, "a broken picture", "circle"),   # only the unreadable image has it: not a query
            (CORRUPT, "a red circle", "circle"),
            ("images/extra.png", "a red square", "circle"),  # also on a 'square' image: ambiguous group
            ("images/extra.png", "a copy of a red circle", "circle"),
        ])
    return csv_path


def _tiny_checkpoint(directory: Path, seed: int) -> Path:
    cfg = OmegaConf.load(REPO / "configs/model/tiny.yaml")
    torch.manual_seed(seed)
    model, tokenizer = build_model(cfg)
    pre = Preprocessing(cfg.image.image_size, tuple(cfg.image.mean), tuple(cfg.image.std), cfg.text.max_tokens)
    save_checkpoint(directory, model.eval(), tokenizer, cfg, pre)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return [_tiny_checkpoint(root / f"seed{seed}", seed) for seed in (0, 1)]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args, "progress=false"], cwd=REPO,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def eval_run(dataset, checkpoints, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_out")
    proc = _run("evaluation.evaluate", f"checkpoint={checkpoints[0]}", "data=captions_csv", f"data.csv={dataset}",
                "split=all", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _report_tables(text: str) -> dict[str, dict[str, str]]:
    """'## heading' -> {label: value} of the two-column tables under it."""
    tables: dict[str, dict[str, str]] = {}
    heading = None
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        elif heading and line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 2 and cells[0] != "metric":
                tables.setdefault(heading, {})[cells[0]] = cells[1].strip("`")
    return tables


def _close_to_printed(printed: str, value: float) -> bool:
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(float(printed) - value) <= 0.5 * 10 ** -decimals + 1e-9


def _expected_pool(csv_path: Path) -> tuple[set[str], set[str]]:
    """Readable images and their distinct captions, read straight from the CSV."""
    rows = [r for r in csv.DictReader(csv_path.open()) if r["image"] != CORRUPT]
    return {r["image"] for r in rows}, {r["caption"] for r in rows}


def test_cli_writes_every_report_file(eval_run):
    for name in REPORT_FILES:
        assert (eval_run / name).is_file(), name
    for name in ("recall_at_k.png", "rank_histogram.png", "worst_queries.png"):
        with Image.open(eval_run / name) as image:
            image.load()
            assert image.width >= 400 and image.height >= 300, (name, image.size)
            assert len(image.convert("RGB").getcolors(1 << 20) or []) > 20, f"{name} looks blank"


def test_metrics_json_matches_report_md(eval_run, checkpoints):
    metrics = json.loads((eval_run / "metrics.json").read_text())
    tables = _report_tables((eval_run / "report.md").read_text())
    assert set(metrics["directions"]) == set(TITLES)
    for direction, values in metrics["directions"].items():
        table = tables[TITLES[direction]]
        assert table["split"] == metrics["split"] == "all"
        assert table["model id"] == metrics["model_id"]
        assert table["checkpoint"] == metrics["checkpoint"] == str(checkpoints[0].resolve())
        assert int(table["queries"]) == values["num_queries"]
        assert int(table["candidates"]) == values["num_candidates"]
        for label, key in [("R@1", "R@1"), ("R@5", "R@5"), ("R@10", "R@10"), ("MRR", "MRR"), ("MAP", "MAP"),
                           ("median rank", "median_rank"), ("mean rank", "mean_rank"), ("chance MRR", "chance_MRR")]:
            assert _close_to_printed(table[label], values[key]), (direction, label, table[label], values[key])


def test_query_and_candidate_counts_follow_the_data(eval_run, dataset):
    metrics = json.loads((eval_run / "metrics.json").read_text())
    images, captions = _expected_pool(dataset)
    t2i, i2t, group = (metrics["directions"][d] for d in ("text_to_image", "image_to_text", "text_to_image_group"))
    assert (t2i["num_queries"], t2i["num_candidates"]) == (len(captions), len(images)) == (49, 25)
    assert (i2t["num_queries"], i2t["num_candidates"]) == (len(images), len(captions))
    assert metrics["num_images"] == len(images) + 1 and metrics["num_images_evaluated"] == len(images)
    assert metrics["skipped_images"] == 1
    assert [Path(p).name for p in metrics["skipped_image_reasons"]] == ["corrupt.jpg"]
    # "a red square" is on a 'square' image and on extra.png ('circle'): its group is ambiguous, so skipped.
    assert group["ambiguous_queries"] == group["skipped_queries"] == 1
    assert group["num_queries"] == len(captions) - 1 and group["num_groups"] == 4


def test_per_query_csv_agrees_with_metrics(eval_run):
    metrics = json.loads((eval_run / "metrics.json").read_text())
    rows = list(csv.DictReader((eval_run / "per_query.csv").open()))
    for direction, values in metrics["directions"].items():
        mine = [r for r in rows if r["direction"] == direction]
        assert len(mine) == values["num_queries"]
        ranks = [int(r["first_relevant_rank"]) for r in mine]
        assert all(1 <= rank <= values["num_candidates"] for rank in ranks)
        assert math.isclose(sum(1 / r for r in ranks) / len(ranks), values["MRR"], abs_tol=1e-9)
        assert math.isclose(sum(float(r["average_precision"]) for r in mine) / len(mine), values["MAP"], abs_tol=1e-5)
        assert math.isclose(metrics["recall_at_k_curve"][direction][0], values["R@1"])
    shared = next(r for r in rows if r["direction"] == "text_to_image" and r["query"] == "a red square")
    assert shared["num_relevant"] == "2"


def test_scores_of_known_embeddings():
    samples = [Sample("a", "a.png", ("red", "crimson"), "warm"), Sample("b", "b.png", ("red", "blue"), "cold"),
               Sample("c", "c.png", ("green",), "cold")]
    pool = CaptionPool.from_samples(samples)  # red, crimson, blue, green
    images = torch.eye(3)
    texts = torch.nn.functional.normalize(pool.text_to_image_relevance(3).float(), dim=1)
    oracle = evaluate_embeddings(samples, images, texts, pool)
    for direction in ("text_to_image", "image_to_text"):
        assert oracle[direction].metrics["MRR"] == oracle[direction].metrics["MAP"] == 1.0
    assert oracle["text_to_image_group"].metrics["skipped_queries"] == 1  # "red" is on a warm and a cold image
    worst = evaluate_embeddings(samples, images, -texts, pool)["text_to_image"]
    assert worst.first_ranks.tolist() == [2, 3, 3, 3] and worst.metrics["median_rank"] == 3.0
    # One query per (image, caption) pair: "red" is on two images, so it counts twice.
    assert worst.metrics["per_pair_queries"] == 5
    assert math.isclose(worst.metrics["per_pair_MRR"], (2 / 2 + 1 / 3 * 3) / 5)
    assert worst.metrics["per_pair_R@1"] == 0.0 and worst.metrics["per_pair_R@5"] == 1.0
    # E[1/first position] with 2 relevant among 4 candidates in random order: 1/2 + 1/2 * 1/3 + 1/6 * 1/3.
    assert math.isclose(chance_mrr(torch.tensor([2]), 4), 1 / 2 + 1 / 6 + 1 / 18)
    assert math.isclose(chance_mrr(torch.tensor([1, 1]), 24), sum(1 / k for k in range(1, 25)) / 24)


def test_missing_checkpoint_exits_2_with_one_line(dataset, tmp_path):
    proc = _run("evaluation.evaluate", f"checkpoint={tmp_path / 'nope'}", "data=captions_csv", f"data.csv={dataset}",
                f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nope" in errors[0] and "not a checkpoint" in errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_empty_split_is_a_clear_error(dataset):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["checkpoint=x", "data=captions_csv", f"data.csv={dataset}",
                                                      "split=test", "data.split_fractions=[1.0,0.0,0.0]"])
    with pytest.raises(CliError, match="split 'test' of captions_csv is empty"):
        load_split(cfg)


def test_compare_two_checkpoints(dataset, checkpoints, eval_run, tmp_path):
    proc = _run("evaluation.compare", f"checkpoints=[{checkpoints[0]},{checkpoints[1]}]", "names=[heads,finetuned]",
                "data=captions_csv", f"data.csv={dataset}", "split=all", "num_workers=0", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in (tmp_path / "comparison.md").read_text().splitlines() if line.startswith("| metric"))
    assert "| heads |" in header and "| finetuned |" in header
    payload = json.loads((tmp_path / "comparison.json").read_text())
    assert [c["name"] for c in payload["checkpoints"]] == ["heads", "finetuned"]
    assert payload["checkpoints"][0]["model_id"] != payload["checkpoints"][1]["model_id"]
    # Same function, same data: the comparison's figures for heads are the single evaluation's.
    single = json.loads((eval_run / "metrics.json").read_text())
    assert payload["checkpoints"][0]["directions"]["text_to_image"]["MRR"] == pytest.approx(
        single["directions"]["text_to_image"]["MRR"], abs=1e-6)
    with Image.open(tmp_path / "recall_at_k.png") as image:
        assert image.width >= 400
    assert (tmp_path / "heads" / "report.md").is_file() and (tmp_path / "finetuned" / "worst_queries.png").is_file()

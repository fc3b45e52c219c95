"""evaluation.suite on the tiny recipe: two checkpoints x fake caption-CSV domains, one table.

The command runs in-process through its main() (the same Hydra entry point as `python -m`)."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, compose_train
from data.fixtures import make_shapes_dataset
from data.readers import read_caption_csv
from data.transforms import Preprocessing
from evaluation.cli import CliError
from evaluation.evaluate import evaluate_checkpoint
from evaluation import suite
from evaluation.suite import accept_domain_list, run_suite, trained_datasets
from training.checkpoint import load_checkpoint, save_checkpoint
from training.loop import Trainer, trained_dataset_names
from training.model import build_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def domain_csvs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("suite_data")
    return {"shapes_a": make_shapes_dataset(root / "a", count=24, size=32, seed=0),
            "shapes_b": make_shapes_dataset(root / "b", count=16, size=32, seed=1)}


@pytest.fixture(scope="module")
def checkpoints(domain_csvs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("suite_ckpts")
    # A run on shapes_a (data.name=shapes_a): Trainer.save records "datasets": ["shapes_a"] in config.json.
    # (Saved right away: what it learns does not matter here, only what the suite reads back.)
    cfg = compose_train(["experiment=tiny", f"data.csv={domain_csvs['shapes_a']}", "data.name=shapes_a"])
    Trainer(cfg, root / "run").save({"train_loss": 0.0})
    # A zero-shot-style checkpoint: untrained, "zeroshot": true, "datasets": [] (as training.zeroshot writes).
    model_cfg = OmegaConf.load(REPO / "configs/model/tiny.yaml")
    torch.manual_seed(1)
    model, tokenizer = build_model(model_cfg)
    pre = Preprocessing(model_cfg.image.image_size, tuple(model_cfg.image.mean), tuple(model_cfg.image.std),
                        model_cfg.text.max_tokens)
    save_checkpoint(root / "zs", model.eval(), tokenizer, model_cfg, pre, extra={"zeroshot": True, "datasets": []})
    return {"trained": root / "run" / "last", "zs": root / "zs"}


def domain_overrides(domain_csvs) -> list[str]:
    a, b = domain_csvs["shapes_a"], domain_csvs["shapes_b"]
    return [
        f"+domains.shapes_a={{data:captions_csv,split:all,overrides:{{csv:'{a}',name:shapes_a}}}}",
        # an inline reader instead of a configs/data/ name; every image in its test split
        f"+domains.shapes_b={{reader:{{_target_:data.readers.read_caption_csv,csv_path:'{b}'}},"
        "split_fractions:[0.0,0.0,1.0]}",
        "+domains.ghost={data:captions_csv,overrides:{csv:'/nonexistent/ghost/captions.csv'}}",
        "+domains.nodata={data:no_such_dataset}",
    ]


def run_main(*args: str) -> str:
    """`python -m evaluation.suite ARGS` in this process (no second torch import); returns its stdout.

    Exits (SystemExit) like the command; Hydra's logging setup is left off so pytest's stays."""
    argv = ["evaluation/suite.py", *args, "progress=false", "num_workers=0",
            "hydra/job_logging=none", "hydra/hydra_logging=none"]
    saved, sys.argv = sys.argv, argv
    try:
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            suite.main()
    finally:
        sys.argv = saved
    return stdout.getvalue()


@pytest.fixture(scope="module")
def suite_run(domain_csvs, checkpoints, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("suite_out")
    stdout = run_main(f"checkpoints=[{checkpoints['trained']},{checkpoints['zs']}]", "names=[trained,zs]",
                      "domains=[shapes_a,shapes_b,ghost,nodata]", "split=test", *domain_overrides(domain_csvs),
                      f"output_dir={out}")
    return out, stdout


def test_suite_json_structure_and_held_out_marking(suite_run):
    out, _ = suite_run
    payload = json.loads((out / "suite.json").read_text())
    assert list(payload["domains"]) == ["shapes_a", "shapes_b", "ghost", "nodata"]
    a, b, ghost, nodata = (payload["domains"][n] for n in ("shapes_a", "shapes_b", "ghost", "nodata"))
    assert a["status"] == b["status"] == "ok"
    assert a["split"] == "all" and b["split"] == "test"  # the domain's own split, else the suite's
    assert (a["num_images"], a["num_queries"], a["num_candidates"]) == (24, 48, 24)
    assert ghost["status"] == "not available" and "/nonexistent/ghost/captions.csv" in ghost["reason"]
    assert nodata["status"] == "not available" and "configs/data/no_such_dataset.yaml" in nodata["reason"]

    trained, zs = payload["checkpoints"]
    assert (trained["name"], zs["name"]) == ("trained", "zs")
    assert trained["trained_on"] == ["shapes_a"] and trained["trained_on_from"] == "datasets"
    assert list(trained["domains"]) == ["shapes_a", "shapes_b"]  # no entry for unavailable domains
    assert trained["domains"]["shapes_a"]["seen_in_training"] is True
    assert trained["domains"]["shapes_b"]["seen_in_training"] is False
    assert trained["seen_domains"] == ["shapes_a"] and trained["held_out_domains"] == ["shapes_b"]
    assert trained["held_out_mean_MRR"] == trained["domains"]["shapes_b"]["text_to_image"]["MRR"]
    assert zs["zeroshot"] is True and zs["trained_on"] == [] and zs["held_out_domains"] == ["shapes_a", "shapes_b"]
    assert zs["held_out_mean_MRR"] == pytest.approx(
        (zs["domains"]["shapes_a"]["text_to_image"]["MRR"] + zs["domains"]["shapes_b"]["text_to_image"]["MRR"]) / 2)
    for row in (trained, zs):
        for entry in row["domains"].values():
            assert set(entry["text_to_image"]) == {"MRR", "R@1", "R@10", "num_queries", "num_candidates"}
            assert 0 < entry["image_to_text"]["MRR"] <= 1
    relative = payload["relative_to_zeroshot"]
    assert relative["reference"] == "zs"
    for domain in ("shapes_a", "shapes_b"):
        assert relative["MRR_ratio"][domain]["trained"] == pytest.approx(
            trained["domains"][domain]["text_to_image"]["MRR"] / zs["domains"][domain]["text_to_image"]["MRR"])


def test_numbers_equal_a_single_evaluation(suite_run, domain_csvs, checkpoints):
    out, _ = suite_run
    payload = json.loads((out / "suite.json").read_text())
    row = payload["checkpoints"][0]["domains"]["shapes_a"]
    samples = read_caption_csv(str(domain_csvs["shapes_a"]))
    result = evaluate_checkpoint(load_checkpoint(checkpoints["trained"]), samples, ks=(1, 5, 10), num_workers=0,
                                 progress=False)
    t2i, i2t = result.directions["text_to_image"].metrics, result.directions["image_to_text"].metrics
    for key in ("MRR", "R@1", "R@10"):
        assert row["text_to_image"][key] == pytest.approx(t2i[key], abs=1e-6), key
    assert (row["text_to_image"]["num_queries"], row["text_to_image"]["num_candidates"]) == (
        t2i["num_queries"], t2i["num_candidates"])
    assert row["image_to_text"]["MRR"] == pytest.approx(i2t["MRR"], abs=1e-6)


def test_suite_md_table(suite_run):
    out, stdout = suite_run
    text = (out / "suite.md").read_text()
    table = [line for line in text.split("\n## ")[0].splitlines() if line.startswith("| ")]  # the main table
    header = table[0]
    assert "shapes_a MRR / R@10" in header and "ghost MRR / R@10" in header and "held-out mean MRR" in header
    info = next(line for line in table if line.startswith("| *split"))
    assert "all · 48 × 24" in info and "not available: " in info
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")] for line in table}
    trained, zs = cells["trained"], cells["zs"]
    assert trained[1].endswith("*") and not trained[2].endswith("*")  # shapes_a seen, shapes_b held out
    assert trained[3] == trained[4] == "n/a"
    assert not zs[1].endswith("*") and zs[5].endswith("(2)")
    assert "## MRR relative to zero-shot" in text and "×" in text
    assert "shapes_a MRR / R@10" in stdout and "held-out mean MRR" in stdout  # the table is printed too


def test_user_errors_exit_2(checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(f"checkpoint={tmp_path / 'nope'}", f"output_dir={tmp_path / 'out'}")
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nope" in errors[0] and "not a checkpoint" in errors[0]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for overrides, message in [(["only=[]"], "no domains"), (["only=[atlantis]"], "unknown domain"),
                                   (["only=[nodata]", "+domains.nodata={data:no_such_dataset}"],
                                    "none of the domains is available")]:
            cfg = compose(config_name="suite", overrides=[f"checkpoint={checkpoints['zs']}", *overrides])
            with pytest.raises(CliError, match=message):
                run_suite(cfg)


def test_training_datasets_recorded_and_inferred():
    assert trained_dataset_names(OmegaConf.create({"name": "openclipart"})) == ["openclipart"]
    mixture = OmegaConf.create({"name": "mixture", "datasets": {"tabler": {"weight": 1}, "mdi": {"weight": 2}}})
    assert trained_dataset_names(mixture) == ["tabler", "mdi"]
    assert trained_datasets({"datasets": ["tabler", "mdi"], "data": "x"}) == (["tabler", "mdi"], "datasets")
    assert trained_datasets({"data": "data.readers.read_openclipart"}) == (["openclipart"], "data")
    assert trained_datasets({"data": "data.readers.read_caption_csv"}) == (["captions_csv"], "data")
    assert trained_datasets({"datasets": [], "zeroshot": True}) == ([], "datasets")
    assert trained_datasets({}) == (None, "unknown")
    assert accept_domain_list(["x", "domains=[a,b]", "+domains.c={data:d}"]) == ["x", "only=[a,b]",
                                                                                "+domains.c={data:d}"]

"""evaluation.suite on the tiny recipe: two checkpoints x fake caption-CSV domains, one table.

The command runs in-process through its main() (the same Hydra entry point as `python -m`).
Checkpoints with a fully frozen backbone share its features (one pass per domain and backbone):
their numbers must still be those of evaluation.evaluate."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, compose_train
from data.fixtures import make_shapes_dataset
from data.readers import read_caption_csv
from data.records import select_split
from data.transforms import Preprocessing
from evaluation.cli import CliError
from evaluation.embedding import embed_image_paths, embed_texts
from evaluation.evaluate import evaluate_checkpoint
from evaluation import shared_features, suite
from evaluation.backbone_keys import Backbones, backbones_of, image_backbone_key, text_backbone_key
from evaluation.domains import trained_datasets
from evaluation.shared_features import embed_prefixes, image_prefix_paths, text_prefixes
from evaluation.suite import accept_domain_list, run_suite
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
    # the compact image->text table: one MRR per available domain, the same marks
    section = text.split("## Image → text MRR")[1].split("\n## ")[0]
    i2t = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
           for line in section.splitlines() if line.startswith("| ")}
    assert i2t["checkpoint"] == ["checkpoint", "shapes_a", "shapes_b"]
    payload = json.loads((out / "suite.json").read_text())
    for row in payload["checkpoints"]:
        for column, domain in ((1, "shapes_a"), (2, "shapes_b")):
            mrr = row["domains"][domain]["image_to_text"]["MRR"]
            assert i2t[row["name"]][column].rstrip("*") == f"{mrr:.3f}"
    assert i2t["trained"][1].endswith("*") and not i2t["trained"][2].endswith("*")
    assert "## Image → text MRR" in stdout  # printed with the main table
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


# --- shared frozen backbones ------------------------------------------------------------------------

def frozen_model_cfg(**changes):
    """The tiny recipe with both encoders fully frozen (trainable_stages=0, trainable_layers=0)."""
    cfg = OmegaConf.load(REPO / "configs/model/tiny.yaml")
    cfg.image.trainable_stages, cfg.text.trainable_layers = 0, 0
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    return cfg


FROZEN = {  # name -> (seed of its heads, model config changes)
    "heads_a": (1, {}),
    "heads_b": (2, {}),
    "mix": (3, {"zeroshot.weight": 0.5}),           # a fixed zero-shot readout beside the heads
    "pooled2": (4, {"image.pooled_stages": 2}),     # same weights, another image output: another backbone
}


@pytest.fixture(scope="module")
def frozen_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of one frozen tiny backbone that differ in their heads (as heads-only runs do)."""
    root = tmp_path_factory.mktemp("frozen_ckpts")
    torch.manual_seed(0)
    base, _ = build_model(frozen_model_cfg())
    paths = {}
    for name, (seed, changes) in FROZEN.items():
        cfg = frozen_model_cfg(**changes)
        torch.manual_seed(seed)
        model, tokenizer = build_model(cfg)
        model.image_encoder.load_state_dict(base.image_encoder.state_dict())
        model.text_encoder.load_state_dict(base.text_encoder.state_dict())
        pre = Preprocessing(cfg.image.image_size, tuple(cfg.image.mean), tuple(cfg.image.std), cfg.text.max_tokens)
        save_checkpoint(root / name, model.eval(), tokenizer, cfg, pre, extra={"datasets": []})
        paths[name] = root / name
    return paths


def test_backbone_keys(frozen_checkpoints, checkpoints):
    loaded = {name: load_checkpoint(path) for name, path in frozen_checkpoints.items()}
    keys = {name: backbones_of(checkpoint) for name, checkpoint in loaded.items()}
    assert keys["heads_a"].image == keys["heads_b"].image == keys["mix"].image is not None
    assert keys["pooled2"].image not in (None, keys["heads_a"].image)
    assert len({k.text for k in keys.values()}) == 1 and keys["heads_a"].text is not None
    # trainable stages / layers: nothing to share
    assert backbones_of(load_checkpoint(checkpoints["trained"])) == Backbones(None, None)
    # the preprocessing and the precision are part of the key
    checkpoint = loaded["heads_a"]
    for change in ({"mean": (0.5, 0.5, 0.5)}, {"image_size": 40}):
        other = dataclasses.replace(checkpoint, preprocessing=dataclasses.replace(checkpoint.preprocessing, **change))
        assert image_backbone_key(other) != keys["heads_a"].image
        assert text_backbone_key(other) == keys["heads_a"].text
    other = dataclasses.replace(checkpoint, preprocessing=dataclasses.replace(checkpoint.preprocessing, max_tokens=8))
    assert text_backbone_key(other) != keys["heads_a"].text and image_backbone_key(other) == keys["heads_a"].image
    bf16 = dataclasses.replace(checkpoint, use_bf16=True)
    assert backbones_of(bf16).image != keys["heads_a"].image and backbones_of(bf16).text != keys["heads_a"].text


@pytest.mark.parametrize("use_bf16", [False, True])
def test_embeddings_from_shared_prefixes_equal_direct_ones(frozen_checkpoints, domain_csvs, use_bf16):
    paths = [s.image_path for s in read_caption_csv(str(domain_csvs["shapes_a"]))]
    texts = sorted({c for s in read_caption_csv(str(domain_csvs["shapes_a"])) for c in s.captions})
    first = dataclasses.replace(load_checkpoint(frozen_checkpoints["heads_a"]), use_bf16=use_bf16)
    images = image_prefix_paths(first, paths, batch_size=8, num_workers=0, progress=False)
    captions = text_prefixes(first, texts, batch_size=16, progress=False)
    assert images.values.dtype == captions.values.dtype == torch.float32 and images.indices == list(range(len(paths)))
    assert images.dtype == (torch.bfloat16 if use_bf16 else torch.float32)  # fed back to the heads as produced
    for name in ("heads_a", "heads_b", "mix"):  # one backbone pass, every checkpoint of it
        checkpoint = dataclasses.replace(load_checkpoint(frozen_checkpoints[name]), use_bf16=use_bf16)
        direct_images = embed_image_paths(checkpoint, paths, batch_size=8, num_workers=0, progress=False)
        direct_texts = embed_texts(checkpoint, texts, batch_size=16, progress=False)
        shared_images = embed_prefixes(checkpoint, checkpoint.model.embed_image_prefix, images, 8)
        shared_texts = embed_prefixes(checkpoint, checkpoint.model.embed_text_prefix, captions, 16)
        torch.testing.assert_close(shared_images, direct_images.embeddings, atol=1e-6, rtol=0)
        torch.testing.assert_close(shared_texts, direct_texts, atol=1e-6, rtol=0)


def test_shared_backbones_give_the_numbers_of_evaluate(frozen_checkpoints, checkpoints, domain_csvs, monkeypatch,
                                                       caplog):
    passes = {"image": 0, "text": 0}

    def counting(side, function):
        def wrapper(*args, **kwargs):
            passes[side] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(shared_features, "image_prefix_paths", counting("image", shared_features.image_prefix_paths))
    monkeypatch.setattr(shared_features, "text_prefixes", counting("text", shared_features.text_prefixes))
    names = [*FROZEN, "trained"]
    paths = [*frozen_checkpoints.values(), checkpoints["trained"]]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="suite", overrides=[
            f"checkpoints=[{','.join(map(str, paths))}]", f"names=[{','.join(names)}]", "only=[shapes_a,shapes_b]",
            "split=test", "progress=false", "num_workers=0", "batch_size=8", *domain_overrides(domain_csvs)])
    with caplog.at_level(logging.INFO, logger="evaluation"):
        payload = run_suite(cfg)
    # one image pass per (domain, image backbone): 2 backbones x 2 domains; one text pass per domain
    assert passes == {"image": 4, "text": 2}
    messages = caplog.text
    assert "3 checkpoints share image backbone" in messages and "heads_a, heads_b, mix" in messages
    assert "4 checkpoints share text backbone" in messages
    assert "not fully frozen (embedded end to end): trained" in messages
    rows = {row["name"]: row for row in payload["checkpoints"]}
    assert rows["heads_a"]["image_backbone"] == rows["mix"]["image_backbone"] != rows["pooled2"]["image_backbone"]
    assert rows["trained"]["image_backbone"] is None and rows["trained"]["text_backbone"] is None

    # The same numbers as evaluation.evaluate (no sharing, full forward pass) on the same samples.
    samples = {"shapes_a": read_caption_csv(str(domain_csvs["shapes_a"])),
               "shapes_b": select_split(read_caption_csv(str(domain_csvs["shapes_b"])), "test", (0.0, 0.0, 1.0))}
    for name, path in zip(names, paths):
        checkpoint = load_checkpoint(path)
        for domain, domain_samples in samples.items():
            result = evaluate_checkpoint(checkpoint, domain_samples, ks=(1, 5, 10), num_workers=0, progress=False)
            entry = rows[name]["domains"][domain]
            for direction in ("text_to_image", "image_to_text"):
                expected = result.directions[direction].metrics
                got = entry["metrics"][direction]
                assert set(got) == set(expected), (name, domain, direction)
                for key, value in expected.items():
                    assert got[key] == pytest.approx(value, abs=1e-6, nan_ok=True), (name, domain, direction, key)

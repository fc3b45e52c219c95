"""Training on the tiny recipe: configs compose, checkpoints round-trip, resume, freezing."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONFIG_DIR, compose_train
from training.checkpoint import load_checkpoint
from training.loop import STATE_FILE, Trainer
from training.model import MAX_LOGIT_SCALE, build_model

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(csv_path, *extra):
    return compose_train(["experiment=tiny", f"data.csv={csv_path}", *extra])


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml")))
def test_every_experiment_config_composes(experiment):
    cfg = compose_train([f"experiment={experiment}"])
    if "csv" in cfg.data:  # a CSV dataset: the path is the one mandatory value
        cfg = compose_train([f"experiment={experiment}", "data.csv=/x.csv"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.model.embed_dim > 0 and cfg.trainer.batch_size > 0


@pytest.mark.parametrize("model", sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml")))
def test_every_model_recipe_composes(model):
    cfg = compose_train([f"model={model}"])
    assert {"image", "text", "head", "embed_dim"} <= set(cfg.model)


def test_few_steps_write_a_checkpoint_that_loads_back_identically(shapes_csv, tmp_path):
    trainer = Trainer(tiny_cfg(shapes_csv, "trainer.max_steps=3"), tmp_path)
    trainer.fit()
    loaded = load_checkpoint(tmp_path / "last", device="cpu", bf16=False)
    trainer.model.eval()
    pixels = torch.randn(4, 3, 32, 32)
    texts = ["a red circle", "square in blue", "a yellow cross", "x"]
    with torch.no_grad():
        expected_images = trainer.model.encode_image(pixels.contiguous(memory_format=torch.channels_last))
        tokens = loaded.tokenize(texts)
        expected_texts = trainer.model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(loaded.embed_images(pixels), expected_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded.embed_texts(texts), expected_texts, atol=1e-6, rtol=0)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert rows and {"val/R@1", "val/R@5", "val/MRR", "train_loss", "logit_scale"} <= set(rows[0])
    assert (tmp_path / "best" / "model.safetensors").exists()


def test_loss_falls_on_a_tiny_overfit_set(shapes_csv, tmp_path):
    cfg = tiny_cfg(shapes_csv, "trainer.max_steps=40", "trainer.max_epochs=100", "data.split_fractions=[1.0,0.0,0.0]",
                   "trainer.warmup_steps=1")
    trainer = Trainer(cfg, tmp_path)
    batch = next(trainer.batches.epoch(seed=0, epoch=0))
    with torch.no_grad():
        before = trainer.training_loss(batch).item()
    trainer.fit()
    with torch.no_grad():
        after = trainer.training_loss(batch).item()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("views", [1, 3])
def test_cached_prefixes_match_the_live_model(shapes_csv, tmp_path, views):
    """The cached eval view is exactly what the frozen prefix computes on that image."""
    from data.images import load_image
    from data.transforms import eval_transform

    cfg = tiny_cfg(shapes_csv, "trainer.cache_features=true", "trainer.max_steps=5", f"trainer.cache_views={views}")
    trainer = Trainer(cfg, tmp_path)
    sample = trainer.batches.samples[0]
    pixels = eval_transform(trainer.preprocessing)(load_image(sample.image_path, 32)).unsqueeze(0)
    with torch.no_grad():
        live = trainer.model.image_encoder.forward_prefix(pixels.contiguous(memory_format=torch.channels_last))
    cached = trainer.batches.images[0, 0] if views > 1 else trainer.batches.images[0]
    torch.testing.assert_close(cached.float(), live[0].float(), atol=2e-2, rtol=2e-2)  # cache stores bf16 maps
    if views > 1:
        assert not torch.equal(trainer.batches.images[0, 1], trainer.batches.images[0, 0])  # augmented view differs
    trainer.fit()
    assert trainer.step == 5 and (tmp_path / "last" / "model.safetensors").exists()


def test_resume_continues_from_saved_step_with_same_optimizer_state(shapes_csv, tmp_path):
    first = Trainer(tiny_cfg(shapes_csv, "trainer.max_steps=3"), tmp_path / "a")
    first.fit()
    saved = torch.load(tmp_path / "a" / "last" / STATE_FILE, weights_only=True)
    resumed = Trainer(tiny_cfg(shapes_csv, "trainer.max_steps=6", f"trainer.resume={tmp_path / 'a' / 'last'}"),
                      tmp_path / "b")
    assert resumed.step == 3 == saved["step"]
    for group_state, saved_state in zip(resumed.optimizer.state_dict()["state"].values(), saved["optimizer"]["state"].values()):
        torch.testing.assert_close(group_state["exp_avg"], saved_state["exp_avg"])
    torch.testing.assert_close(resumed.model.logit_scale.detach(), first.model.logit_scale.detach())
    resumed.fit()
    assert resumed.step == 6


def test_frozen_parameters_get_no_gradient_and_do_not_change(shapes_csv, tmp_path):
    cfg = tiny_cfg(shapes_csv, "trainer.max_steps=3", "model.image.trainable_stages=1", "model.text.trainable_layers=1")
    trainer = Trainer(cfg, tmp_path)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    frozen_bn = {n: b.clone() for n, b in trainer.model.image_encoder.stages[0].named_buffers()}
    assert any(n.startswith("image_encoder.stages.0") for n in frozen)
    assert any(n.startswith("text_encoder.stages.0") for n in frozen)
    trainer.model.train()
    loss = trainer.training_loss(next(trainer.batches.epoch(0, 0)))
    loss.backward()
    for name, param in trainer.model.named_parameters():
        if name in frozen:
            assert param.grad is None, name
    assert trainer.model.image_head.linear.weight.grad is not None
    trainer.optimizer.zero_grad()
    trainer.fit()
    for name, param in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(param.detach(), frozen[name]), name
    for name, buffer in trainer.model.image_encoder.stages[0].named_buffers():
        assert torch.equal(buffer, frozen_bn[name]), f"batch-norm statistic {name} moved"


def test_multi_stage_pooling_concatenates_the_last_stages(shapes_csv, tmp_path):
    cfg = tiny_cfg(shapes_csv, "trainer.max_steps=2", "trainer.cache_features=true", "model.image.trainable_stages=0",
                   "model.image.pooled_stages=2")
    trainer = Trainer(cfg, tmp_path)
    encoder = trainer.model.image_encoder
    assert encoder.out_dim == 256 + 512  # layer3 + layer4 widths of the tiny ResNet
    assert trainer.batches.images.shape[1] == encoder.out_dim
    trainer.fit()
    loaded = load_checkpoint(tmp_path / "last", device="cpu", bf16=False)
    assert loaded.embed_images(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    with pytest.raises(ValueError, match="pooled_stages"):
        build_model(OmegaConf.merge(cfg.model, {"image": {"trainable_stages": 1}}))


def test_logit_scale_stays_clamped(shapes_csv, tmp_path):
    cfg = tiny_cfg(shapes_csv, "trainer.max_steps=4", "optimizer.lr=10.0", "trainer.grad_clip_norm=null",
                   "model.init_temperature=0.0101")
    trainer = Trainer(cfg, tmp_path)
    trainer.fit()
    assert 0.0 <= trainer.model.logit_scale.item() <= MAX_LOGIT_SCALE + 1e-6


def test_corrupt_images_are_skipped_and_counted(shapes_csv, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = Path(shapes_csv).read_text().splitlines()
    rows = [line.replace("images/", f"{Path(shapes_csv).parent}/images/") for line in lines[1:]]
    (data / "broken.jpg").write_bytes(Path(shapes_csv).parent.joinpath(rows[1].split(",")[0]).read_bytes()[:200])
    (data / "text.png").write_text("not an image")
    Image.new("RGB", (4, 4)).save(data / "ok.png")
    extra = ["broken.jpg,a broken photo,x", "text.png,a text file,x", "ok.png,a black square,x"]
    csv_path = data / "captions.csv"
    csv_path.write_text("\n".join([lines[0], *rows, *extra]) + "\n")
    cfg = tiny_cfg(csv_path, "trainer.max_steps=2", "data.split_fractions=[1.0,0.0,0.0]", "trainer.batch_size=4")
    trainer = Trainer(cfg, tmp_path / "run")
    for _ in trainer.batches.epoch(0, 0):
        pass
    assert len(trainer.failures) == 2
    assert any("broken.jpg" in reason for reason in trainer.failures.reasons.values())
    trainer.fit()
    assert (tmp_path / "run" / "skipped_images.txt").read_text().count("\n") == 2


def test_train_cli_runs_and_writes_run_folder(shapes_csv, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "training.train", "experiment=tiny", f"data.csv={shapes_csv}", "trainer.max_steps=2",
         f"hydra.run.dir={run}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run / ".hydra" / "config.yaml").exists() and (run / "best" / "config.json").exists()
    resolved = OmegaConf.load(run / "resolved_config.yaml")
    assert resolved.data.reader.csv_path == str(shapes_csv) and resolved.trainer.max_steps == 2


def test_missing_data_gives_one_clear_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training.train", "experiment=tiny", f"data.csv={tmp_path / 'nope.csv'}",
         f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "nope.csv" in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_missing_required_setting_gives_one_clear_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training.train", "experiment=tiny", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "data.csv" in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_tiny_model_builds_without_downloads():
    model, tokenizer = build_model(OmegaConf.load(Path(CONFIG_DIR) / "model" / "tiny.yaml"))
    assert len(tokenizer) > 1000 and model.embed_dim == 32


def test_frozen_text_features_are_cached_on_disk(shapes_csv, tmp_path, monkeypatch):
    """A second run with the same frozen text encoder and captions reads them back, identical."""
    import training.batches

    overrides = ["trainer.cache_features=true", "trainer.max_steps=1", f"trainer.cache_dir={tmp_path / 'cache'}",
                 "model.text.trainable_layers=0", "model.image.trainable_stages=0"]
    first = Trainer(tiny_cfg(shapes_csv, *overrides), tmp_path / "a").batches.text.values
    assert any(p.name.startswith("text-") for p in (tmp_path / "cache").iterdir())

    def no_recompute(*args, **kwargs):
        raise AssertionError("text features were recomputed instead of read from the cache")

    monkeypatch.setattr(training.batches, "text_prefixes", no_recompute)
    second = Trainer(tiny_cfg(shapes_csv, *overrides), tmp_path / "b").batches.text.values
    torch.testing.assert_close(second, first)


def test_squash_resize_keeps_the_edges_that_crop_cuts():
    from data.transforms import Preprocessing, eval_transform

    image = Image.new("RGB", (96, 32), "white")
    image.paste((255, 0, 0), (0, 0, 16, 32))  # a red band at the far left of a wide picture
    crop = eval_transform(Preprocessing(image_size=32, mean=(0, 0, 0), std=(1, 1, 1)))(image)
    squash = eval_transform(Preprocessing(image_size=32, mean=(0, 0, 0), std=(1, 1, 1), resize="squash"))(image)
    assert crop.shape == squash.shape == (3, 32, 32)
    assert crop[1, :, :4].min() > 0.9           # the centre crop lost the red band (green channel stays 1)
    assert squash[1, :, :4].max() < 0.1         # squashed, the band is still there
    assert Preprocessing.from_dict(Preprocessing(resize="squash").to_dict()).resize == "squash"
    assert "resize" not in Preprocessing().to_dict()  # crop, the default, keeps old cache keys and checkpoints
    with pytest.raises(ValueError, match="crop or squash"):
        eval_transform(Preprocessing(resize="stretch"))


def test_pooled_text_features_keep_the_order_of_the_texts():
    """Texts are batched by length for speed; each row must still be its own text's embedding."""
    from data.transforms import tokenize
    from training.features import text_prefixes

    cfg = OmegaConf.load(REPO / "configs/model/tiny.yaml")
    cfg.text.trainable_layers = 0
    model, tokenizer = build_model(cfg)
    texts = ["a very long caption about a red circle on a white ground", "sun", "a blue square", "tree, green"]
    features = text_prefixes(model, tokenizer, texts, 16, torch.device("cpu"), False, batch_size=2)
    assert features.mask is None
    for row, text in enumerate(texts):
        tokens = tokenize(tokenizer, [text], 16)
        with torch.no_grad():
            alone = model.text_encoder(tokens["input_ids"], tokens["attention_mask"])[0]
        torch.testing.assert_close(features.values[row], alone, atol=1e-5, rtol=1e-4)

"""The zero-shot readout: its maths, the fixed-part embedding, the checkpoint CLI and its round trip."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import compose_train
from data.transforms import tokenize
from training.checkpoint import load_checkpoint
from training.loop import Trainer
from training.model import build_model
from training.zeroshot import ZeroShotReadout, class_text_embeddings, imagenet_class_texts

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(weight: float, text_trainable_layers: int = 0):
    cfg = OmegaConf.load(REPO / "configs/model/tiny.yaml")
    cfg.zeroshot.weight = weight
    cfg.text.trainable_layers = text_trainable_layers
    return cfg


def test_class_texts_follow_the_classifier_order():
    first, lemmas, gloss = (imagenet_class_texts(kind) for kind in ("first", "lemmas", "gloss"))
    assert len(first) == len(lemmas) == len(gloss) == 1000
    assert first[1] == ["goldfish"]                       # index 1 of ImageNet-1k
    assert "Carassius auratus" not in lemmas[1]           # Latin binomials dropped
    assert lemmas[817] == ["sports car", "sport car"]     # synonyms kept
    assert gloss[1][0].startswith("goldfish: small golden")
    with pytest.raises(ValueError, match="class_names"):
        imagenet_class_texts("everything")


def test_readout_is_probabilities_times_class_embeddings():
    torch.manual_seed(0)
    classifier = torch.nn.Linear(6, 4)
    class_emb = F.normalize(torch.randn(4, 5), dim=-1)
    readout = ZeroShotReadout(classifier, class_emb, temperature=2.0)
    features = torch.randn(3, 10)                          # a multi-stage concatenation: last 6 are the last stage
    expected = F.normalize(torch.softmax(classifier(features[:, -6:]) / 2.0, -1) @ class_emb, dim=-1)
    torch.testing.assert_close(readout(features), expected)
    # One class certain -> exactly that class's text embedding.
    with torch.no_grad():
        classifier.weight.zero_(), classifier.bias.copy_(torch.tensor([0.0, 100.0, 0.0, 0.0]))
    torch.testing.assert_close(ZeroShotReadout(classifier, class_emb)(features), class_emb[1].expand(3, 5))


def test_class_embeddings_average_templates_and_names():
    model, tokenizer = build_model(tiny_cfg(0.0))
    encoder = model.text_encoder.eval()
    texts = [["dog", "hound"], ["cat"]]
    embeddings = class_text_embeddings(encoder, tokenizer, texts, ["{}", "a photo of a {}"], 16)
    def one(text):
        tokens = tokenize(tokenizer, [text], 16)
        return F.normalize(encoder(tokens["input_ids"], tokens["attention_mask"]), dim=-1)[0]
    dog = F.normalize(sum(one(t) for t in ["dog", "a photo of a dog", "hound", "a photo of a hound"]), dim=0)
    torch.testing.assert_close(embeddings[0], dog, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    centred = class_text_embeddings(encoder, tokenizer, texts, ["{}", "a photo of a {}"], 16, center=True)
    torch.testing.assert_close(centred, embeddings - embeddings.mean(0))   # p @ E - mean(E) for any p


def test_fixed_part_embedding_mixes_cosines_by_weight():
    torch.manual_seed(0)
    weight = 0.6
    model, tokenizer = build_model(tiny_cfg(weight))
    model.eval()
    assert model.embed_dim == 32 + model.text_encoder.out_dim
    pixels = torch.randn(4, 3, 32, 32)
    tokens = tokenize(tokenizer, ["a red circle", "a blue square"], 16)
    image, text = model.encode_image(pixels), model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    # cosine = (1 - w) * cosine of the heads + w * cosine of the readout
    features = model.image_encoder(pixels)
    words = model.text_encoder(tokens["input_ids"], tokens["attention_mask"])
    heads = F.normalize(model.image_head(features), dim=-1) @ F.normalize(model.text_head(words), dim=-1).T
    readout = model.readout(features) @ F.normalize(words, dim=-1).T
    torch.testing.assert_close(image @ text.T, (1 - weight) * heads + weight * readout, atol=1e-5, rtol=1e-4)
    # The readout is fixed: nothing of it is a trainable parameter.
    assert not [name for name, _ in model.named_parameters() if name.startswith("readout")]
    assert not any(p is q for p in model.new_parameters() for q in model.readout.buffers())


def test_readout_needs_a_frozen_text_encoder():
    cfg = tiny_cfg(0.5, text_trainable_layers=2)
    with pytest.raises(ValueError, match="frozen text encoder"):
        build_model(cfg)


def test_zero_shot_checkpoint_cli_round_trip(tmp_path):
    out = tmp_path / "zeroshot"
    proc = subprocess.run([sys.executable, "-m", "training.zeroshot", "model=tiny", "model.text.trainable_layers=0",
                           f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["zeroshot"] is True and config["datasets"] == []
    assert config["model"]["zeroshot"]["weight"] == 1.0
    loaded = load_checkpoint(out, device="cpu", bf16=False)
    model = loaded.model
    assert not model.has_heads and model.embed_dim == model.text_encoder.out_dim
    assert model.readout.class_embeddings.abs().sum() > 0   # the class embeddings travel in the checkpoint
    # The loaded model embeds exactly like a freshly built zero-shot model with the same backbone weights.
    fresh, tokenizer = build_model(OmegaConf.create(config["model"]), pretrained=False, bert_config=config["bert_config"])
    fresh.load_state_dict(model.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_images(pixels), fresh.eval().encode_image(pixels))
        tokens = loaded.tokenize(["a dog", "a red circle"])
        text = loaded.embed_texts(["a dog", "a red circle"])
        torch.testing.assert_close(text, F.normalize(model.text_encoder(tokens["input_ids"], tokens["attention_mask"]), dim=-1))


def test_training_with_a_fixed_readout_moves_only_the_heads(shapes_csv, tmp_path):
    cfg = compose_train(["experiment=tiny", f"data.csv={shapes_csv}", "model.zeroshot.weight=0.5",
                         "model.text.trainable_layers=0", "model.image.trainable_stages=0",
                         "trainer.max_steps=3", "trainer.cache_features=true", "trainer.cache_dir=null"])
    trainer = Trainer(cfg, tmp_path / "run")
    before = {name: value.clone() for name, value in trainer.model.readout.state_dict().items()}
    heads_before = trainer.model.image_head.linear.weight.clone()
    trainer.fit()
    after = trainer.model.readout.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not torch.equal(heads_before, trainer.model.image_head.linear.weight)
    assert math.isclose(trainer.model.zeroshot_weight, 0.5)
    loaded = load_checkpoint(tmp_path / "run" / "last", device="cpu", bf16=False)
    assert loaded.model.zeroshot_weight == 0.5 and loaded.model.embed_dim == 32 + loaded.model.text_encoder.out_dim


def test_train_weight_applies_in_training_mode_and_weight_when_embedding():
    torch.manual_seed(0)
    cfg = tiny_cfg(0.9)
    cfg.zeroshot.train_weight = 0.5
    model, tokenizer = build_model(cfg)
    pixels = torch.randn(3, 3, 32, 32)
    tokens = tokenize(tokenizer, ["a red circle", "a blue square"], 16)

    def mixed(weight):
        features = model.image_encoder(pixels)
        words = model.text_encoder(tokens["input_ids"], tokens["attention_mask"])
        heads = F.normalize(model.image_head(features), dim=-1) @ F.normalize(model.text_head(words), dim=-1).T
        return (1 - weight) * heads + weight * (model.readout(features) @ F.normalize(words, dim=-1).T)

    def cosines():
        return model.encode_image(pixels) @ model.encode_text(tokens["input_ids"], tokens["attention_mask"]).T

    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(cosines(), mixed(0.9), atol=1e-5, rtol=1e-4)
        model.train()
        assert model.image_head.mlp is None  # tiny's heads are linear: no dropout, training mode is deterministic
        torch.testing.assert_close(cosines(), mixed(0.5), atol=1e-5, rtol=1e-4)
    bad = tiny_cfg(1.0)
    bad.zeroshot.train_weight = 0.5
    with pytest.raises(ValueError, match="train_weight"):
        build_model(bad)


def test_model_id_changes_with_the_readout_share(tmp_path):
    from data.transforms import Preprocessing
    from training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model, tokenizer = build_model(tiny_cfg(0.5))
    pre = Preprocessing(32, (0.5,) * 3, (0.5,) * 3, 16)
    first = save_checkpoint(tmp_path / "a", model, tokenizer, tiny_cfg(0.5), pre)
    assert save_checkpoint(tmp_path / "b", model, tokenizer, tiny_cfg(0.5), pre) == first
    model.zeroshot_weight = 0.7  # same weights, other embeddings: the server must see another model
    assert save_checkpoint(tmp_path / "c", model, tokenizer, tiny_cfg(0.7), pre) != first

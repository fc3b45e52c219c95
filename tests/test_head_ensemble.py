"""Ensembles of heads (`model.head.members`): the search cosine is the members' mean, each
member trains on its own loss, and an ensemble checkpoint round-trips."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import compose_train
from data.transforms import tokenize
from training.checkpoint import load_checkpoint
from training.loop import Trainer
from training.loss import contrastive_loss
from training.model import build_model
from test_zeroshot import tiny_cfg


def ensemble_cfg(members: int, weight: float):
    cfg = tiny_cfg(weight)
    cfg.head.hidden_dim = 16
    cfg.head.members = members
    return cfg


def _inputs(tokenizer):
    tokens = tokenize(tokenizer, ["a red circle", "a blue square", "a green star"], 16)
    return torch.randn(3, 3, 32, 32), tokens["input_ids"], tokens["attention_mask"]


def test_search_cosine_is_the_mean_of_the_members_plus_the_readout_share():
    torch.manual_seed(0)
    weight = 0.6
    model, tokenizer = build_model(ensemble_cfg(3, weight))
    model.eval()
    assert model.embed_dim == 3 * 32 + model.text_encoder.out_dim
    pixels, ids, mask = _inputs(tokenizer)
    image, text = model.encode_image(pixels), model.encode_text(ids, mask)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    features, words = model.image_encoder(pixels), model.text_encoder(ids, mask)
    members = [F.normalize(i(features), dim=-1) @ F.normalize(t(words), dim=-1).T
               for i, t in zip(model.image_head.members, model.text_head.members)]
    assert not torch.allclose(members[0], members[1])            # differently initialised
    readout = model.readout(features) @ F.normalize(words, dim=-1).T
    expected = (1 - weight) * torch.stack(members).mean(0) + weight * readout
    torch.testing.assert_close(image @ text.T, expected, atol=1e-5, rtol=1e-4)


def test_each_member_learns_from_its_own_loss_only():
    torch.manual_seed(0)
    model, tokenizer = build_model(ensemble_cfg(2, 0.5))
    model.train()
    for module in model.modules():  # dropout off: the two computations below must see the same heads
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    pixels, ids, mask = _inputs(tokenizer)
    image, text = model.encode_image(pixels), model.encode_text(ids, mask)
    assert image.shape[:2] == (3, 2) and text.shape[:2] == (3, 2)
    loss = contrastive_loss(image, text, model.logit_scale)
    own = [contrastive_loss(image[:, k], text[:, k], model.logit_scale) for k in range(2)]
    torch.testing.assert_close(loss, (own[0] + own[1]) / 2)
    # Member 0's gradient is that of its own loss alone (halved by the mean): member 1 does not enter it.
    loss.backward()
    grad = model.image_head.members[0].linear.weight.grad.clone()
    model.zero_grad()
    image, text = model.encode_image(pixels), model.encode_text(ids, mask)
    (contrastive_loss(image[:, 0], text[:, 0], model.logit_scale) / 2).backward()
    torch.testing.assert_close(model.image_head.members[0].linear.weight.grad, grad)
    assert model.image_head.members[1].linear.weight.grad.abs().sum() == 0


def test_an_ensemble_trains_and_its_checkpoint_round_trips(shapes_csv, tmp_path):
    cfg = compose_train(["experiment=tiny", f"data.csv={shapes_csv}", "model.zeroshot.weight=0.5",
                         "model.head.members=2", "model.head.hidden_dim=16",
                         "model.text.trainable_layers=0", "model.image.trainable_stages=0",
                         "trainer.max_steps=3", "trainer.cache_features=true", "trainer.cache_dir=null"])
    trainer = Trainer(cfg, tmp_path / "run")
    before = [m.linear.weight.clone() for m in trainer.model.image_head.members]
    trainer.fit()
    assert all(not torch.equal(b, m.linear.weight) for b, m in zip(before, trainer.model.image_head.members))
    loaded = load_checkpoint(tmp_path / "run" / "last", device="cpu", bf16=False)
    assert loaded.model.head_members == 2 and loaded.model.embed_dim == 2 * 32 + loaded.model.text_encoder.out_dim
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_images(pixels), trainer.model.eval().encode_image(pixels),
                                   atol=1e-5, rtol=1e-4)


def test_one_member_is_the_plain_head():
    model, _ = build_model(OmegaConf.merge(ensemble_cfg(1, 0.0), {"zeroshot": {"weight": 0.0}}))
    assert type(model.image_head).__name__ == "ProjectionHead"   # old checkpoints' state dicts still load

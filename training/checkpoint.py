"""Checkpoint directories: everything a reader needs, and nothing that executes on load.

    <dir>/model.safetensors   weights
    <dir>/config.json         model config, preprocessing, BERT config, model id, metrics
    <dir>/tokenizer/          tokenizer files

`load_checkpoint` is the one loader evaluation and serving use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from data.transforms import Preprocessing, eval_transform, tokenize
from training.model import DualEncoder, build_model

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(RuntimeError):
    """A path that is not a usable checkpoint, with what is wrong."""


def model_id_of(state_dict: dict[str, torch.Tensor], settings: dict | None = None) -> str:
    """A short hash of the weights (and of `settings` that change embeddings without being
    weights): two checkpoints with the same id embed identically."""
    digest = hashlib.sha256()
    if settings:
        digest.update(json.dumps(settings, sort_keys=True).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def embedding_settings(model: DualEncoder, preprocessing: Preprocessing) -> dict:
    """What changes embeddings besides the weights: the readout's share and temperature, a
    non-default resize. Empty for models without them, so their ids stay what they were."""
    settings = {}
    if model.readout is not None:
        settings["zeroshot"] = {"weight": model.zeroshot_weight, "temperature": model.readout.temperature}
    if preprocessing.resize != "crop":
        settings["resize"] = preprocessing.resize
    return settings


def save_checkpoint(directory: str | Path, model: DualEncoder, tokenizer, model_cfg, preprocessing: Preprocessing,
                    metrics: dict | None = None, extra: dict | None = None) -> str:
    """Write a checkpoint directory atomically enough (weights first, config last). Returns the model id."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    model_id = model_id_of(state, embedding_settings(model, preprocessing))
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"model_id": model_id})
    tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
    config = {
        "format": FORMAT_VERSION,
        "model_id": model_id,
        "model": OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else model_cfg,
        "preprocessing": preprocessing.to_dict(),
        "bert_config": model.text_encoder.config.to_dict(),
        "metrics": metrics or {},
        **(extra or {}),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
    return model_id


@dataclass
class LoadedCheckpoint:
    """A model ready for inference, with the preprocessing it was trained with."""

    model: DualEncoder
    tokenizer: object
    preprocessing: Preprocessing
    model_id: str
    config: dict
    path: Path
    device: torch.device
    use_bf16: bool = False

    @property
    def image_transform(self):
        return eval_transform(self.preprocessing)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return tokenize(self.tokenizer, texts, self.preprocessing.max_tokens)

    def _autocast(self):
        if not self.use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.inference_mode()
    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] preprocessed pixels -> [B,D] unit-norm float32 embeddings (on CPU)."""
        pixels = pixels.to(self.device, memory_format=torch.channels_last)
        with self._autocast():
            return self.model.encode_image(pixels).float().cpu()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        with self._autocast():
            return self.model.encode_text(batch["input_ids"], batch["attention_mask"]).float().cpu()


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 autocast pays off on CUDA with bf16 support and on CPUs with AMX or AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def read_checkpoint_config(path: str | Path) -> dict:
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not path.is_dir() or not config_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"{path} is not a checkpoint directory (needs {CONFIG_FILE}, {WEIGHTS_FILE} and {TOKENIZER_DIR}/); "
            "train one with `python -m training.train` and pass its run folder's best/ or last/ directory"
        )
    return json.loads(config_file.read_text())


def load_checkpoint(path: str | Path, device: str | torch.device = "auto", bf16: bool | str = "auto") -> LoadedCheckpoint:
    """Model (eval mode), tokenizer and preprocessing from a checkpoint directory."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser().resolve()
    config = read_checkpoint_config(path)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model, _ = build_model(OmegaConf.create(config["model"]), pretrained=False, bert_config=config["bert_config"])
    state = load_file(str(path / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval().to(device).to(memory_format=torch.channels_last)
    tokenizer = AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIR), local_files_only=True)
    use_bf16 = bf16_is_fast(device) if bf16 == "auto" else bool(bf16)
    return LoadedCheckpoint(
        model=model, tokenizer=tokenizer, preprocessing=Preprocessing.from_dict(config["preprocessing"]),
        model_id=config["model_id"], config=config, path=path, device=device, use_bf16=use_bf16,
    )

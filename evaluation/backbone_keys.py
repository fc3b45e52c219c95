"""Which checkpoints share a frozen backbone: its key, and one encoder module per key.

A fully frozen image encoder (trainable_stages=0: heads-only models, the zero-shot model, fixed
zero-shot readouts) outputs features that depend on the backbone alone: its weights, pooled_stages,
the checkpoint's image preprocessing and precision. Its key digests exactly those, so equal keys
mean equal features (evaluation.shared_features computes them once per key). Likewise the text
side: text encoder weights and config, pooling, tokenizer, max_tokens, precision.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from training.checkpoint import TOKENIZER_DIR, model_id_of

log = logging.getLogger("evaluation")


@dataclass(frozen=True)
class Backbones:
    """A checkpoint's image and text backbone keys; None for a side that is not fully frozen."""

    image: str | None
    text: str | None

    @property
    def any(self) -> bool:
        return self.image is not None or self.text is not None


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _precision(checkpoint) -> dict:
    """What decides the precision of the forward passes (as LoadedCheckpoint.embed_*)."""
    return {"device": str(checkpoint.device), "bf16": bool(checkpoint.use_bf16)}


def image_backbone_key(checkpoint) -> str | None:
    """What a fully frozen image encoder's output depends on: its weights, architecture and
    pooled_stages, the image preprocessing and the precision. None when it is not fully frozen."""
    encoder = checkpoint.model.image_encoder
    if not encoder.fully_frozen:
        return None
    pre = checkpoint.preprocessing
    arch = (checkpoint.config.get("model") or {}).get("image", {}).get("arch")
    return _digest({"weights": model_id_of(encoder.state_dict()), "arch": arch,
                    "pooled_stages": encoder.pooled_stages, "image_size": pre.image_size,
                    "mean": list(pre.mean), "std": list(pre.std), **_precision(checkpoint)})


# Saved state of a fast tokenizer's last call, not of the tokenizer: data.transforms.tokenize sets
# both on every call (a checkpoint whose readout embedded class names saves other values here).
_TOKENIZER_CALL_STATE = ("truncation", "padding")


def _tokenizer_digest(directory: Path) -> str:
    """The checkpoint's tokenizer files, less the last call's truncation / padding settings."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        content = path.read_bytes()
        if path.name == "tokenizer.json":
            try:
                tokenizer = json.loads(content)
                for key in _TOKENIZER_CALL_STATE:
                    tokenizer.pop(key, None)
                content = json.dumps(tokenizer, sort_keys=True).encode()
            except (ValueError, AttributeError):
                pass
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(content)
    return digest.hexdigest()[:16]


def text_backbone_key(checkpoint) -> str | None:
    """Likewise for the text encoder: weights, BERT config, pooling, tokenizer files, max_tokens, precision."""
    encoder = checkpoint.model.text_encoder
    if not encoder.fully_frozen:
        return None
    config = {key: value for key, value in encoder.config.to_dict().items()
              if not key.startswith("_") and key != "transformers_version"}
    return _digest({"weights": model_id_of(encoder.state_dict()), "config": config, "pooling": encoder.pooling,
                    "tokenizer": _tokenizer_digest(Path(checkpoint.path) / TOKENIZER_DIR),
                    "max_tokens": checkpoint.preprocessing.max_tokens, **_precision(checkpoint)})


def backbones_of(checkpoint) -> Backbones:
    return Backbones(image_backbone_key(checkpoint), text_backbone_key(checkpoint))


def share_encoders(checkpoint, backbones: Backbones, kept: dict[tuple[str, str], torch.nn.Module]) -> None:
    """Checkpoints of one frozen backbone hold one module of it (equal key: equal weights), so
    keeping them all loaded costs one backbone plus their heads."""
    model = checkpoint.model
    if backbones.image is not None:
        model.image_encoder = kept.setdefault(("image", backbones.image), model.image_encoder)
    if backbones.text is not None:
        model.text_encoder = kept.setdefault(("text", backbones.text), model.text_encoder)


def log_sharing(shared: list[tuple[str, Backbones]], alone: list[str]) -> None:
    """Which checkpoints (by name) share a backbone, one pass per domain for all of them; `alone`:
    those with nothing frozen."""
    for side in ("image", "text"):
        groups: dict[str, list[str]] = {}
        for name, backbones in shared:
            key = getattr(backbones, side)
            if key is not None:
                groups.setdefault(key, []).append(name)
        for key, names in groups.items():
            if len(names) > 1:
                log.info("%d checkpoints share %s backbone %s (%s): one %s pass per domain",
                         len(names), side, key, ", ".join(names), side)
            else:
                log.info("%s: frozen %s backbone %s (its own)", names[0], side, key)
        unfrozen = [name for name, backbones in shared if getattr(backbones, side) is None] + alone
        if unfrozen:
            log.info("%s encoder not fully frozen (embedded end to end): %s", side, ", ".join(unfrozen))

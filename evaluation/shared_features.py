"""One frozen backbone pass per (domain, backbone key), finished into each checkpoint's embeddings.

With a fully frozen encoder a checkpoint's image embedding is `model.embed_image_prefix(pooled
backbone features)` (text: `embed_text_prefix`), and those features depend on the backbone key
alone (evaluation.backbone_keys). BackboneFeatures holds one domain's features, computed by the
first checkpoint of a key and reused by the others; evaluate_with_backbones is
evaluation.retrieval.evaluate_checkpoint with the frozen sides taken from there, so the numbers
are those of `evaluation.evaluate` (tests/test_suite.py checks it, fp32 and bf16).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from data.records import Sample
from evaluation.backbone_keys import Backbones
from evaluation.embedding import ImageEmbeddings, embed_image_paths, embed_texts
from evaluation.retrieval import EvalResult, evaluate_checkpoint
from training.features import autocast_for


@dataclass
class Prefixes:
    """Outputs of a fully frozen encoder (its pooled features), float32 on CPU, one row per input."""

    values: torch.Tensor              # [N, F] float32
    dtype: torch.dtype                # what the encoder produced (bf16 under bf16 autocast): fed back as such
    indices: list[int] = field(default_factory=list)         # images: position of each row in the path list
    failures: dict[str, str] = field(default_factory=dict)   # images: path -> reason, for the skipped ones

    def __len__(self) -> int:
        return self.values.shape[0]


def image_prefix_paths(checkpoint, paths: list[str], batch_size: int = 64, num_workers: int = 2,
                       progress: bool = True) -> Prefixes:
    """The fully frozen image encoder's output for every readable image of `paths`: decoded,
    batched, ordered and skipped exactly as evaluation.embedding.embed_image_paths does."""
    encoder = checkpoint.model.image_encoder
    if not encoder.fully_frozen:
        raise ValueError("the image encoder is not fully frozen: its prefix is not the pooled feature vector")
    dtypes: list[torch.dtype] = []

    @torch.inference_mode()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(checkpoint.device, memory_format=torch.channels_last)
        with autocast_for(checkpoint.device, checkpoint.use_bf16):
            prefix = encoder.forward_prefix(pixels)
        dtypes.append(prefix.dtype)
        return prefix.float().cpu()

    images = embed_image_paths(checkpoint, paths, batch_size, num_workers, progress, "image backbone", encode=encode)
    return Prefixes(images.embeddings, dtypes[0] if dtypes else torch.float32, images.indices, images.failures)


def text_prefixes(checkpoint, texts: list[str], batch_size: int = 256, progress: bool = True) -> Prefixes:
    """The fully frozen text encoder's output (pooled) for `texts`, tokenized in the batches of embed_texts."""
    encoder = checkpoint.model.text_encoder
    if not encoder.fully_frozen:
        raise ValueError("the text encoder is not fully frozen: its prefix is not the pooled feature vector")
    dtypes: list[torch.dtype] = []

    @torch.inference_mode()
    def encode(batch: list[str]) -> torch.Tensor:
        tokens = {key: value.to(checkpoint.device) for key, value in checkpoint.tokenize(batch).items()}
        with autocast_for(checkpoint.device, checkpoint.use_bf16):
            prefix = encoder.forward_prefix(tokens["input_ids"], tokens["attention_mask"])
        dtypes.append(prefix.dtype)
        return prefix.float().cpu()

    values = embed_texts(checkpoint, texts, batch_size, progress, "text backbone", encode=encode)
    return Prefixes(values, dtypes[0] if dtypes else torch.float32)


@torch.inference_mode()
def embed_prefixes(checkpoint, embed, prefixes: Prefixes, batch_size: int) -> torch.Tensor:
    """[N, D] float32 unit-norm embeddings: `embed` (model.embed_image_prefix / embed_text_prefix) on
    the prefixes in the dtype the encoder gave them, under the checkpoint's precision."""
    chunks = []
    for start in range(0, len(prefixes), batch_size):
        prefix = prefixes.values[start:start + batch_size].to(checkpoint.device, prefixes.dtype)
        with autocast_for(checkpoint.device, checkpoint.use_bf16):
            chunks.append(embed(prefix).float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, checkpoint.model.embed_dim)


@dataclass
class BackboneFeatures:
    """One domain's frozen backbone outputs, per backbone key: computed by the first checkpoint
    of that backbone, reused by the others, dropped when the domain is done."""

    images: dict[str, Prefixes] = field(default_factory=dict)
    texts: dict[tuple[str, str], Prefixes] = field(default_factory=dict)  # (key, digest of the caption list)
    image_passes: int = 0
    text_passes: int = 0

    def image(self, checkpoint, key: str, paths: list[str], batch_size: int, num_workers: int,
              progress: bool) -> Prefixes:
        if key not in self.images:
            self.images[key] = image_prefix_paths(checkpoint, paths, batch_size, num_workers, progress)
            self.image_passes += 1
        return self.images[key]

    def text(self, checkpoint, key: str, texts: list[str], batch_size: int, progress: bool) -> Prefixes:
        # The caption pool follows the readable images: the same for every image backbone in practice,
        # but keyed by it anyway.
        slot = (key, hashlib.sha256(json.dumps(texts).encode()).hexdigest())
        if slot not in self.texts:
            self.texts[slot] = text_prefixes(checkpoint, texts, batch_size, progress)
            self.text_passes += 1
        return self.texts[slot]


def evaluate_with_backbones(checkpoint, samples: list[Sample], backbones: Backbones, features: BackboneFeatures, *,
                            ks=(1, 5, 10), batch_size: int = 64, text_batch_size: int = 256, num_workers: int = 2,
                            max_queries: int | None = None, seed: int = 0, dataset: str | None = None,
                            split: str | None = None, data_config: dict | None = None,
                            progress: bool = True) -> EvalResult:
    """evaluation.retrieval.evaluate_checkpoint, with a frozen side embedded from `features`
    (computed there once per backbone) and a trainable side end to end as usual."""
    def frozen_images(paths):
        prefixes = features.image(checkpoint, backbones.image, paths, batch_size, num_workers, progress)
        return ImageEmbeddings(embed_prefixes(checkpoint, checkpoint.model.embed_image_prefix, prefixes, batch_size),
                               list(prefixes.indices), dict(prefixes.failures))

    def frozen_texts(texts):
        prefixes = features.text(checkpoint, backbones.text, texts, text_batch_size, progress)
        return embed_prefixes(checkpoint, checkpoint.model.embed_text_prefix, prefixes, text_batch_size)

    return evaluate_checkpoint(checkpoint, samples, ks=ks, batch_size=batch_size, text_batch_size=text_batch_size,
                               num_workers=num_workers, max_queries=max_queries, seed=seed, dataset=dataset,
                               split=split, data_config=data_config, progress=progress,
                               image_embedder=frozen_images if backbones.image is not None else None,
                               text_embedder=frozen_texts if backbones.text is not None else None)

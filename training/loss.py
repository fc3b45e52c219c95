"""Symmetric contrastive (InfoNCE) loss, as in CLIP, with shared captions as co-positives."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     positives: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy over the batch.

    `positives` (bool [B, B], diagonal set) marks pairs that match even off the diagonal,
    e.g. two images with the same caption: without it the loss would push apart embeddings
    that should be identical. Targets spread uniformly over each row's positives.
    """
    logits = logit_scale.exp() * image_emb @ text_emb.T
    if positives is None:
        labels = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    targets = positives.float()
    return 0.5 * (
        F.cross_entropy(logits, targets / targets.sum(1, keepdim=True))
        + F.cross_entropy(logits.T, targets.T / targets.T.sum(1, keepdim=True))
    )


def same_caption_mask(captions: list[str], device=None) -> torch.Tensor:
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    key = torch.tensor([ids[c] for c in captions], device=device)
    return key[:, None] == key[None, :]

"""Symmetric contrastive (InfoNCE) loss, as in CLIP, with shared captions as co-positives."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     positives: torch.Tensor | None = None, all_image: torch.Tensor | None = None,
                     all_text: torch.Tensor | None = None, first_row: int = 0) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy over the batch.

    `positives` (bool [B, B], diagonal set) marks pairs that match even off the diagonal,
    e.g. two images with the same caption: without it the loss would push apart embeddings
    that should be identical. Targets spread uniformly over each row's positives.

    Data-parallel training (training/distributed.py) scores only its own rows: `image_emb` and
    `text_emb` are this process's b pairs, `all_image` / `all_text` the whole global batch's
    [B, D] with these pairs at rows first_row.., and `positives` is [b, B]. The result is the
    mean over the b local rows; with the defaults (all = local) it is the loss of the batch.

    Embeddings of shape [B, K, D] come from K ensemble members (training.model.HeadEnsemble):
    the result is the mean of the K members' own losses, so each learns as a separate model.
    """
    if image_emb.dim() == 3:
        members = range(image_emb.shape[1])
        pick = lambda emb, k: None if emb is None else emb[:, k]  # noqa: E731
        return torch.stack([contrastive_loss(image_emb[:, k], text_emb[:, k], logit_scale, positives,
                                             pick(all_image, k), pick(all_text, k), first_row)
                            for k in members]).mean()
    all_image = image_emb if all_image is None else all_image
    all_text = text_emb if all_text is None else all_text
    scale = logit_scale.exp()
    image_to_text = scale * image_emb @ all_text.T
    text_to_image = scale * text_emb @ all_image.T
    if positives is None:
        labels = torch.arange(len(image_emb), device=image_emb.device) + first_row
        return 0.5 * (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels))
    targets = positives.float()
    targets = targets / targets.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(image_to_text, targets) + F.cross_entropy(text_to_image, targets))


def same_caption_mask(captions: list[str], device=None) -> torch.Tensor:
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    key = torch.tensor([ids[c] for c in captions], device=device)
    return key[:, None] == key[None, :]

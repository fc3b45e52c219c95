"""AdamW with per-part learning rates, and a linear-warmup cosine schedule."""

from __future__ import annotations

import math

import torch


def build_optimizer(model, cfg) -> torch.optim.AdamW:
    """Pretrained (unfrozen) backbone parts get `backbone_lr`; new heads get `lr`.

    Biases, norms and the logit scale get no weight decay (decaying the temperature would
    pull it towards 1).
    """
    groups = []
    for params, lr in ((model.pretrained_parameters(), cfg.backbone_lr), (model.new_parameters(), cfg.lr)):
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups += [
            {"params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, betas=tuple(cfg.betas), eps=cfg.eps)


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """LR multiplier: linear from 0 to 1 over warmup, then cosine down to `min_lr_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

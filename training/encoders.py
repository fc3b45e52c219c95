"""Image and text encoders split into a frozen prefix and a trainable suffix.

Each encoder is a list of stages. The last `trainable` stages are trained, the rest are
frozen (requires_grad off, batch-norm statistics frozen too). Splitting the forward pass at
that boundary lets the trainer cache the frozen prefix's output once and train the suffix
for many steps on CPU.
"""

from __future__ import annotations

import torch
from torch import nn


class StagedEncoder(nn.Module):
    """Base for encoders made of `self.stages`, frozen up to `num_frozen`."""

    stages: nn.ModuleList
    out_dim: int

    def freeze(self, trainable: int) -> None:
        if not 0 <= trainable <= len(self.stages):
            raise ValueError(f"trainable stages must be in [0, {len(self.stages)}], got {trainable}")
        self.num_frozen = len(self.stages) - trainable
        for index, stage in enumerate(self.stages):
            stage.requires_grad_(index >= self.num_frozen)
        self.train(self.training)

    @property
    def fully_frozen(self) -> bool:
        """Then the prefix includes pooling, so a cache of it holds one vector per input."""
        return self.num_frozen == len(self.stages)

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen stages keep their pretrained batch-norm statistics and no dropout.
        for stage in self.stages[: getattr(self, "num_frozen", 0)]:
            stage.eval()
        return self

    def forward(self, *inputs):
        return self.forward_suffix(self.forward_prefix(*inputs))


class ImageEncoder(StagedEncoder):
    """A CNN as stages (stem, blocks..., head) followed by global average pooling."""

    def __init__(self, stages: list[nn.Module], out_dim: int, trainable: int, pooled_stages: int = 1):
        """`pooled_stages` > 1 concatenates the pooled outputs of that many last stages
        (mid-level features transfer better to drawings than the ImageNet-specialised last one);
        it needs a fully frozen encoder, where the whole pass is the cached prefix."""
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.pooled_stages = pooled_stages
        self.freeze(trainable)
        if pooled_stages > 1 and not self.fully_frozen:
            raise ValueError("pooled_stages > 1 needs trainable_stages=0")
        self.out_dim = out_dim if pooled_stages == 1 else self._pooled_width()

    @torch.no_grad()
    def _pooled_width(self) -> int:
        was_training = self.training
        self.eval()
        width = self.forward_prefix(torch.zeros(1, 3, 64, 64)).shape[1]
        self.train(was_training)
        return width

    def forward_prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = []
        for index, stage in enumerate(self.stages[: self.num_frozen]):
            pixels = stage(pixels)
            if index >= len(self.stages) - self.pooled_stages:
                pooled.append(self._pool(pixels))
        if not self.fully_frozen:
            return pixels
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)

    def forward_suffix(self, features: torch.Tensor) -> torch.Tensor:
        if self.fully_frozen:
            return features
        for stage in self.stages[self.num_frozen :]:
            features = stage(features)
        return self._pool(features)

    @staticmethod
    def _pool(features: torch.Tensor) -> torch.Tensor:
        return features.mean(dim=(2, 3))


class TextEncoder(StagedEncoder):
    """A BERT model as stages (embeddings, layer 1..N) with mean or CLS pooling."""

    def __init__(self, bert: nn.Module, trainable: int, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.config = bert.config
        self.stages = nn.ModuleList([bert.embeddings, *bert.encoder.layer])
        self.out_dim = bert.config.hidden_size
        self.pooling = pooling
        self.freeze(trainable)

    def forward_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Hidden states after the frozen stages, and the mask (both needed downstream)."""
        hidden = input_ids
        for index in range(self.num_frozen):
            hidden = self._run_stage(index, hidden, attention_mask)
        if self.fully_frozen:
            return self._pool(hidden, attention_mask)
        return hidden, attention_mask

    def forward_suffix(self, prefix) -> torch.Tensor:
        if self.fully_frozen:
            return prefix
        hidden, attention_mask = prefix
        for index in range(self.num_frozen, len(self.stages)):
            hidden = self._run_stage(index, hidden, attention_mask)
        return self._pool(hidden, attention_mask)

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def _run_stage(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return self.stages[0](input_ids=hidden)
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        return self.stages[index](hidden, mask)

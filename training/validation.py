"""Per-epoch validation: text->image retrieval on the val split, with the evaluation metrics.

The frozen prefixes never change during training, so val images and captions go through
them once; each validation then only reruns the trainable suffixes and heads.
"""

from __future__ import annotations

import torch

from data.dataset import FailureLog
from data.records import Sample
from evaluation.metrics import retrieval_metrics
from evaluation.relevance import CaptionPool
from training.features import autocast_for, image_prefixes, text_prefixes


class Validator:
    def __init__(self, model, tokenizer, samples: list[Sample], preprocessing, device, use_bf16: bool,
                 num_workers: int, failures: FailureLog, batch_size: int = 256):
        images, ok = image_prefixes(model, [s.image_path for s in samples], preprocessing, device, use_bf16,
                                    64, num_workers, failures, desc="val image features")
        keep = ok.nonzero().squeeze(1)
        self.images = images[keep]
        self.pool = CaptionPool.from_samples([samples[i] for i in keep.tolist()])
        self.text = text_prefixes(model, tokenizer, self.pool.captions, preprocessing.max_tokens, device,
                                  use_bf16, desc="val text features")
        self.relevance = self.pool.text_to_image_relevance(len(self.images))
        self.device, self.use_bf16, self.batch_size = device, use_bf16, batch_size

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        image_emb = self._embed(model.embed_image_prefix, lambda rows: self.images[rows].to(self.device, torch.float32),
                                len(self.images))
        text_emb = self._embed(model.embed_text_prefix, lambda rows: self.text.select(rows, self.device),
                               len(self.pool.captions))
        model.train(was_training)
        metrics = retrieval_metrics(text_emb @ image_emb.T, self.relevance, ks=(1, 5, 10))
        return {f"val/{k}": v for k, v in metrics.items() if k in ("R@1", "R@5", "R@10", "MRR", "MAP", "median_rank")}

    def _embed(self, embed, rows_to_prefix, count: int) -> torch.Tensor:
        out = []
        for start in range(0, count, self.batch_size):
            rows = torch.arange(start, min(count, start + self.batch_size))
            with autocast_for(self.device, self.use_bf16):
                out.append(embed(rows_to_prefix(rows)).float().cpu())
        return torch.cat(out)

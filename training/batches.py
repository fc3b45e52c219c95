"""Where training batches come from: cached frozen-prefix features, or images decoded live.

Both sources yield `Batch`es holding the frozen prefixes' outputs, so the train step is the
same either way: run the trainable suffixes and heads, then the loss.

Under torchrun each process reads its `Shard` of every epoch (training/distributed.py): the
same epoch order on every rank, every world_size-th position, so `batch_size` stays the global
batch and `len()` the number of global batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, RandomSampler

from data.dataset import FailureLog, ImageCaptionDataset, collate_skipping_failures
from data.mixture import mixture_epoch_indices, mixture_sources
from data.records import Sample
from data.transforms import tokenize, train_transform
from training.distributed import Shard
from training.features import DiskCache, TextPrefixes, autocast_for, image_prefixes, text_prefixes


@dataclass
class Batch:
    image_prefix: object
    text_prefix: object
    captions: list[str]
    sources: list | None = None  # each pair's dataset (Sample.source)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Each epoch's order depends only on (seed, epoch), so a resumed run replays it exactly."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class CachedBatches:
    """Image prefixes computed once (eval view); every caption phrasing's text prefix too."""

    def __init__(self, model, tokenizer, samples: list[Sample], preprocessing, device, use_bf16: bool,
                 batch_size: int, caption_augmentation: bool, num_workers: int, failures: FailureLog,
                 cache_dir: str | None = None, views: int = 1, weights: dict | None = None,
                 shard: Shard = Shard()):
        paths = [s.image_path for s in samples]
        disk = DiskCache(cache_dir)
        key = disk.key(model.image_encoder, preprocessing, paths, views)
        cached = disk.load(key)
        if cached is None:
            torch.manual_seed(views)  # the augmented views are the same in every run
            cached = image_prefixes(model, paths, preprocessing, device, use_bf16, 64 // views or 1, num_workers,
                                    failures, desc="train image features", views=views)
            disk.save(key, *cached)
        else:
            for path, ok in zip(paths, cached[1].tolist()):
                if not ok:
                    failures.add(path, f"unreadable (cached result): {path}")
        images, ok = cached
        keep = ok.nonzero().squeeze(1)
        self.images = images[keep]
        self.samples = [samples[i] for i in keep.tolist()]
        phrasings = [s.captions + (s.aug_captions if caption_augmentation else ()) for s in self.samples]
        texts = list(dict.fromkeys(t for p in phrasings for t in p))
        row_of = {t: i for i, t in enumerate(texts)}
        self.caption_rows = [[row_of[t] for t in p] for p in phrasings]
        self.texts = texts
        self.text = self._text_prefixes(model, tokenizer, texts, preprocessing.max_tokens, device, use_bf16, disk)
        self.batch_size, self.device, self.views = batch_size, device, views
        self.shard, self.local_batch_size = shard, shard.local_batch_size(batch_size)
        self.weights, self.sources = weights, mixture_sources(self.samples, weights)

    @staticmethod
    def _text_prefixes(model, tokenizer, texts, max_tokens, device, use_bf16, disk: DiskCache) -> TextPrefixes:
        """Pooled text features are cached on disk too when the whole text encoder is frozen."""
        if not model.text_encoder.fully_frozen:
            return text_prefixes(model, tokenizer, texts, max_tokens, device, use_bf16, desc="train text features")
        key = disk.text_key(model.text_encoder, max_tokens, texts)
        cached = disk.load(key)
        if cached is not None:
            return TextPrefixes(cached[0], None)
        prefixes = text_prefixes(model, tokenizer, texts, max_tokens, device, use_bf16, desc="train text features")
        disk.save(key, prefixes.values, torch.ones(len(texts), dtype=torch.bool))
        return prefixes

    def __len__(self) -> int:
        return len(self.samples) // self.batch_size

    def epoch(self, seed: int, epoch: int, skip_batches: int = 0):
        generator = epoch_generator(seed, epoch)
        if self.sources:  # several datasets: weighted draw (data.mixture); picks and views per position
            order = mixture_epoch_indices(self.sources, self.weights, generator)
            picks = torch.rand(len(order), generator=generator)
            view_of = torch.randint(self.views, (len(order),), generator=generator)
        else:  # per-sample draws read in epoch order: the same values as indexing them by sample
            order = torch.randperm(len(self.samples), generator=generator)
            picks = torch.rand(len(self.samples), generator=generator)[order]
            view_of = torch.randint(self.views, (len(self.samples),), generator=generator)[order]
        mine = self.shard.positions(len(order), self.batch_size)
        for b in range(skip_batches, len(self)):
            span = mine[b * self.local_batch_size : (b + 1) * self.local_batch_size]
            rows = order[span]
            text_rows = torch.tensor([
                self.caption_rows[i][int(p * len(self.caption_rows[i]))] for i, p in zip(rows.tolist(), picks[span])
            ])
            yield Batch(
                image_prefix=self._images(rows, view_of[span]),
                text_prefix=self.text.select(text_rows, self.device),
                captions=[self.texts[i] for i in text_rows.tolist()],
                sources=[self.samples[i].source for i in rows.tolist()],
            )

    def _images(self, rows: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        images = self.images[rows, views] if self.views > 1 else self.images[rows]
        return images.to(self.device, torch.float32)


class StreamingBatches:
    """Images decoded and augmented every epoch (random resized crop, flip); prefixes run live."""

    def __init__(self, model, tokenizer, samples: list[Sample], preprocessing, device, use_bf16: bool,
                 batch_size: int, caption_augmentation: bool, num_workers: int, failures: FailureLog,
                 weights: dict | None = None, shard: Shard = Shard()):
        self.model, self.tokenizer, self.preprocessing = model, tokenizer, preprocessing
        self.samples = samples
        self.dataset = ImageCaptionDataset(samples, train_transform(preprocessing), preprocessing.image_size,
                                           caption_augmentation)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shard, self.local_batch_size = shard, shard.local_batch_size(batch_size)
        self.device, self.use_bf16, self.failures = device, use_bf16, failures
        self.weights, self.sources = weights, mixture_sources(samples, weights)

    def __len__(self) -> int:
        return len(self.samples) // self.batch_size

    def epoch(self, seed: int, epoch: int, skip_batches: int = 0):
        # Caption choice in the main process (num_workers=0); each rank draws its own.
        random.seed(seed * 100_003 + epoch + 7_919 * self.shard.rank)
        if self.sources:  # several datasets: weighted draw (data.mixture)
            order = mixture_epoch_indices(self.sources, self.weights, epoch_generator(seed, epoch))
        else:
            order = torch.tensor(list(RandomSampler(self.dataset, generator=epoch_generator(seed, epoch))))
        sampler = order[self.shard.positions(len(order), self.batch_size)].tolist()
        loader = DataLoader(self.dataset, batch_size=self.local_batch_size, sampler=sampler, drop_last=True,
                            num_workers=self.num_workers, collate_fn=collate_skipping_failures,
                            worker_init_fn=_seed_worker)
        for number, batch in enumerate(loader):
            for index, reason in batch["failed"]:
                self.failures.add(self.samples[index].image_path, reason)
            if number < skip_batches:
                continue
            if batch["pixels"] is None or len(batch["index"]) < 2:
                if self.shard.world_size > 1:
                    yield None  # the other ranks must learn that this rank has no pairs to train on
                continue
            tokens = tokenize(self.tokenizer, batch["captions"], self.preprocessing.max_tokens)
            with torch.no_grad(), autocast_for(self.device, self.use_bf16):
                image_prefix = self.model.image_encoder.forward_prefix(
                    batch["pixels"].to(self.device, memory_format=torch.channels_last))
                text_prefix = self.model.text_encoder.forward_prefix(
                    tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
            yield Batch(image_prefix, text_prefix, batch["captions"],
                        [self.samples[i].source for i in batch["index"].tolist()])


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)



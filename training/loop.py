"""The training loop: batches -> trainable suffixes + heads -> contrastive loss -> AdamW.

A run folder holds: `.hydra/` (the resolved config), `metrics.csv` (one row per epoch),
`last/` (checkpoint + optimizer/scheduler/RNG state, for resume) and `best/` (the
checkpoint with the best validation metric).

Under torchrun the loop runs once per process; what differs between ranks (their shard of the
data, the gathered loss, who validates and writes) is in training/distributed.py, passed in as
`dist`. Only rank 0 validates, writes the run folder and shows progress.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from tqdm import tqdm

from data.dataset import FailureLog
from data.errors import DataUnavailableError
from data.mixture import dataset_weights, source_counts
from data.records import select_split
from data.transforms import Preprocessing
from training.batches import CachedBatches, StreamingBatches
from training.checkpoint import bf16_is_fast, save_checkpoint
from training.distributed import Distributed
from training.features import autocast_for
from training.model import build_model
from training.optim import build_optimizer, warmup_cosine
from training.validation import Validator

log = logging.getLogger(__name__)
STATE_FILE = "training_state.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def preprocessing_of(model_cfg) -> Preprocessing:
    return Preprocessing(model_cfg.image.image_size, tuple(model_cfg.image.mean), tuple(model_cfg.image.std),
                         model_cfg.text.max_tokens, model_cfg.image.get("resize", "crop"))


def read_samples(data_cfg) -> list:
    """Instantiate the configured reader, surfacing its own error instead of Hydra's wrapper."""
    try:
        return instantiate(data_cfg.reader)
    except InstantiationException as error:
        cause = error.__cause__ or error.__context__
        raise cause if isinstance(cause, DataUnavailableError) else error


def trained_dataset_names(data_cfg) -> list[str]:
    """The dataset names a run trains on: a mixture's `datasets` keys, else the data config's `name`."""
    if data_cfg.get("datasets"):
        return [str(name) for name in data_cfg.datasets]
    return [str(data_cfg.get("name", "unknown"))]


class Trainer:
    def __init__(self, cfg, run_dir: str | Path, dist: Distributed | None = None):
        self.cfg, self.tcfg = cfg, cfg.trainer
        self.dist = dist or Distributed()
        self.run_dir = Path(run_dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        self.device = self.dist.device(self.tcfg.device)
        self.use_bf16 = bf16_is_fast(self.device) if self.tcfg.precision == "auto" else self.tcfg.precision == "bf16"
        torch.set_num_threads(self.tcfg.num_threads or torch.get_num_threads())

        self.model, self.tokenizer = build_model(cfg.model)
        self.model.to(self.device)
        self.step_module = self.dist.wrap(self.model)  # DDP under torchrun
        if self.dist.enabled:
            log.info("%s: global batch %d, %d per process", self.dist.describe(), self.tcfg.batch_size,
                     self.tcfg.batch_size // self.dist.world_size)
            torch.manual_seed(cfg.seed + self.dist.rank)  # augmentations differ between ranks
        self.preprocessing = preprocessing_of(cfg.model)
        self.failures = FailureLog()
        samples = read_samples(cfg.data)
        fractions = tuple(cfg.data.split_fractions)
        train_samples = select_split(samples, "train", fractions)
        val_samples = select_split(samples, "val", fractions)
        if cfg.data.get("max_samples"):
            train_samples, val_samples = train_samples[: cfg.data.max_samples], val_samples[: cfg.data.max_samples]
        log.info("%d train / %d val samples", len(train_samples), len(val_samples))
        weights = dataset_weights(cfg.data)  # data=mixture: per-dataset sampling weights
        if weights:
            log.info("per source: train %s, val %s; weights %s", source_counts(train_samples),
                     source_counts(val_samples), weights)

        common = dict(model=self.model, tokenizer=self.tokenizer, preprocessing=self.preprocessing,
                      device=self.device, use_bf16=self.use_bf16, num_workers=self.tcfg.num_workers,
                      failures=self.failures)
        shard = self.dist.shard
        if self.tcfg.cache_features:
            self.batches = CachedBatches(samples=train_samples, batch_size=self.tcfg.batch_size,
                                         caption_augmentation=cfg.data.caption_augmentation,
                                         cache_dir=self.tcfg.cache_dir, views=self.tcfg.cache_views, weights=weights,
                                         shard=shard, **common)
        else:
            self.batches = StreamingBatches(samples=train_samples, batch_size=self.tcfg.batch_size,
                                            caption_augmentation=cfg.data.caption_augmentation, weights=weights,
                                            shard=shard, **common)
        if len(self.batches) == 0:
            raise ValueError(f"{len(train_samples)} training samples do not fill one batch of {self.tcfg.batch_size}")
        self.validator = Validator(samples=val_samples, **common) if val_samples and self.dist.is_main else None

        self.accumulate = self.tcfg.accumulate_grad_batches
        self.steps_per_epoch = max(1, len(self.batches) // self.accumulate)
        self.total_steps = self.tcfg.max_steps or self.steps_per_epoch * self.tcfg.max_epochs
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.scheduler = warmup_cosine(self.optimizer, self.tcfg.warmup_steps, self.total_steps,
                                       cfg.optimizer.min_lr_ratio)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_score = -math.inf
        if self.tcfg.resume:
            self.load_state(self.tcfg.resume)

    # --- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict:
        started = time.monotonic()
        deadline = started + 60 * self.tcfg.max_minutes if self.tcfg.max_minutes else math.inf
        last_metrics: dict = {}
        while self.step < self.total_steps and not self.out_of_time(deadline):
            epoch = self.epoch
            train_stats = self.train_epoch(deadline)
            if self.batch_in_epoch == 0:
                self.epoch += 1  # before saving, so a resume starts the next epoch
            last_metrics = {"epoch": epoch, "step": self.step, **train_stats, **self.validate(),
                            "elapsed_s": round(time.monotonic() - started, 1), "skipped_images": len(self.failures)}
            if self.dist.is_main:
                self.append_metrics(last_metrics)
                self.save(last_metrics)
            self.dist.barrier()  # the other ranks wait for validation and the checkpoint
        if len(self.failures) and self.dist.is_main:
            (self.run_dir / "skipped_images.txt").write_text("\n".join(self.failures.reasons.values()) + "\n")
            log.warning("%d unreadable images were skipped; list in %s", len(self.failures),
                        self.run_dir / "skipped_images.txt")
        return last_metrics

    def train_epoch(self, deadline: float) -> dict:
        self.model.train()
        total_batches = len(self.batches)
        progress = tqdm(total=total_batches, initial=self.batch_in_epoch, desc=f"epoch {self.epoch}",
                        unit="batch", dynamic_ncols=True, disable=not self.dist.is_main)
        loss_sum, seen, tick = 0.0, 0, time.monotonic()
        for batch in self.batches.epoch(self.cfg.seed, self.epoch, skip_batches=self.batch_in_epoch):
            if not self.dist.all_true(batch is not None):
                continue  # some rank's whole share of this batch was unreadable: every rank skips it
            boundary = (self.batch_in_epoch + 1) % self.accumulate == 0
            with self.dist.no_sync(self.step_module, boundary):
                loss = self.training_loss(batch)
                (loss / self.accumulate).backward()
            value, count = self.dist.global_value(loss, len(batch.captions))
            self.batch_in_epoch += 1
            loss_sum, seen = loss_sum + value * count, seen + count  # the global batch's
            if boundary:
                self.optimizer_step()
            progress.update(1)
            progress.set_postfix(loss=f"{value:.3f}", scale=f"{self.model.logit_scale.exp().item():.1f}",
                                 samples_s=f"{seen / max(1e-9, time.monotonic() - tick):.0f}")
            if self.step >= self.total_steps or self.out_of_time(deadline):
                break
        progress.close()
        if self.batch_in_epoch >= total_batches - total_batches % self.accumulate:
            self.batch_in_epoch = 0  # epoch finished
        elapsed = time.monotonic() - tick
        return {"train_loss": loss_sum / max(1, seen), "logit_scale": self.model.logit_scale.exp().item(),
                "lr": self.scheduler.get_last_lr()[-1], "samples_per_s": seen / max(1e-9, elapsed)}

    def training_loss(self, batch) -> torch.Tensor:
        """The loss to back-propagate (under torchrun, this rank's share: see Distributed.loss)."""
        with autocast_for(self.device, self.use_bf16):
            image_emb, text_emb, logit_scale = self.step_module(batch.image_prefix, batch.text_prefix)
        captions = batch.captions if self.cfg.loss.shared_caption_positives else None
        return self.dist.loss(image_emb, text_emb, logit_scale, captions)

    def optimizer_step(self) -> None:
        if self.tcfg.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.tcfg.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.clamp_logit_scale()
        self.scheduler.step()
        self.step += 1

    def out_of_time(self, deadline: float) -> bool:
        """Past `trainer.max_minutes`; under torchrun all ranks stop together (rank 0's clock)."""
        if deadline == math.inf:
            return False
        return bool(self.dist.broadcast(time.monotonic() >= deadline))

    def validate(self) -> dict:
        if self.validator is None:
            return {}
        metrics = self.validator(self.model)
        log.info("step %d: %s", self.step, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    # --- outputs ----------------------------------------------------------------------------

    def append_metrics(self, row: dict) -> None:
        path = self.run_dir / "metrics.csv"
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def save(self, metrics: dict) -> None:
        extra = {"step": self.step, "epoch": self.epoch, "data": str(self.cfg.data.reader.get("_target_")),
                 "datasets": trained_dataset_names(self.cfg.data)}  # read by evaluation.suite (held-out domains)
        save_checkpoint(self.run_dir / "last", self.model, self.tokenizer, self.cfg.model, self.preprocessing,
                        metrics, extra)
        torch.save(self.training_state(), self.run_dir / "last" / STATE_FILE)
        score = metrics.get(self.tcfg.monitor)
        if score is None and self.validator is None:
            score = -metrics["train_loss"]  # no val split: fall back to the training loss
        if score is not None and score > self.best_score:
            self.best_score = score
            save_checkpoint(self.run_dir / "best", self.model, self.tokenizer, self.cfg.model, self.preprocessing,
                            metrics, extra)
            log.info("new best %s = %.4f saved to %s", self.tcfg.monitor, score, self.run_dir / "best")

    def training_state(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best_score": self.best_score, "torch_rng": torch.get_rng_state(),
        }

    def load_state(self, directory: str | Path) -> None:
        """Resume: weights from the checkpoint, optimizer/scheduler/counters from its state file."""
        from safetensors.torch import load_file

        directory = Path(directory)
        state_file = directory / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"cannot resume: {state_file} not found (resume from a run's last/ folder)")
        self.model.load_state_dict(load_file(str(directory / "model.safetensors")))
        state = torch.load(state_file, map_location="cpu", weights_only=True)  # tensors and plain types only
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_score = state["best_score"]
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from %s at step %d (epoch %d)", directory, self.step, self.epoch)

"""Data-parallel training across processes (torchrun): everything the loop needs to know about ranks.

`torchrun --nproc_per_node=N -m training.train ...` starts N copies of the trainer. This module
makes N copies behave like one process training on the same global batch, so a recipe means
the same thing on one CPU and on eight GPUs:

- `trainer.batch_size` is the *global* batch; each rank takes batch_size / N of it. Every rank
  draws the same epoch order from (seed, epoch) and takes positions rank, rank + N, ... of it
  (DistributedSampler's rule), cut to whole global batches: global batch b is then exactly the
  samples a single process would put in batch b, whatever N is.
- The contrastive loss needs every pair of the global batch as a negative. Each rank gathers all
  ranks' embeddings (`gather_with_grad`: the local rows keep their graph), scores its own rows
  against all columns, and the backward all-reduce sends every rank the gradient of its rows
  (the "local loss" of open_clip). After DDP averages the gradients, they equal those of one
  process on the global batch.
- Batch norm in the trained stages (tiny and ResNet recipes) normalises with the statistics of
  the global batch (`sync_batch_norm`); torch's SyncBatchNorm runs on GPUs only, this also on CPU.
- Only rank 0 validates, writes checkpoints, metrics and logs, and shows progress.

Backend: nccl when the trainer runs on CUDA, gloo on CPU. With one process (no torchrun) every
function here is the identity and no process group is created.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from training.loss import contrastive_loss, same_caption_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """Which part of each global batch this process trains on."""

    rank: int = 0
    world_size: int = 1

    def local_batch_size(self, batch_size: int) -> int:
        if batch_size % self.world_size:
            raise ValueError(f"trainer.batch_size={batch_size} (the global batch) must divide evenly "
                             f"among {self.world_size} processes")
        return batch_size // self.world_size

    def positions(self, count: int, batch_size: int) -> torch.Tensor:
        """Positions in an epoch order of `count` items that this rank reads, in batch order.

        Cut to whole global batches, then every world_size-th position from `rank`: local batch b
        (batch_size / world_size positions) belongs to the same global batch b on every rank.
        """
        used = count // batch_size * batch_size
        return torch.arange(used)[self.rank :: self.world_size]


class Distributed:
    """The process group of a torchrun launch, or a world of one."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, backend: str | None = None):
        self.rank, self.world_size, self.local_rank, self.backend = rank, world_size, local_rank, backend
        self.shard = Shard(rank, world_size)

    @classmethod
    def from_env(cls, device: str = "auto", timeout_minutes: float = 30) -> "Distributed":
        """Joins the group torchrun describes in WORLD_SIZE / RANK / LOCAL_RANK (one process without it)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() if device == "auto" else str(device).startswith("cuda")
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        return cls(rank, world_size, local_rank, backend)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The trainer's device: with CUDA, this process's own GPU (LOCAL_RANK)."""
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type == "cuda" and self.enabled and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def describe(self) -> str:
        if not self.enabled:
            return "world size 1 (one process)"
        return f"world size {self.world_size} (backend {self.backend}, this is rank {self.rank})"

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's value (any picklable object) on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over ranks of a few numbers (for logging)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def all_true(self, flag: bool) -> bool:
        """Whether every rank says yes (a world of one: the flag itself)."""
        if not self.enabled:
            return flag
        (yes,) = self.sum(float(bool(flag)))
        return yes == self.world_size

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def wrap(self, model: nn.Module) -> nn.Module:
        """What the loop calls for embeddings: the model's train-step forward, under DDP when distributed."""
        step = TrainStep(model)
        if not self.enabled:
            return step
        sync_batch_norm(model)
        device_ids = [model.logit_scale.device.index] if model.logit_scale.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(step, device_ids=device_ids)

    def no_sync(self, step_module: nn.Module, sync: bool):
        """Skip the gradient all-reduce on micro-batches before the last one of an accumulation."""
        if sync or not isinstance(step_module, nn.parallel.DistributedDataParallel):
            return nullcontext()
        return step_module.no_sync()

    def loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
             captions: list[str] | None) -> torch.Tensor:
        """The loss to back-propagate: with one process, the batch's contrastive loss.

        `captions` (None: only the diagonal is positive) marks pairs sharing a caption as positives.
        Distributed, it is this rank's rows against the global batch, scaled so that DDP's mean
        of the ranks' gradients is the gradient of the global batch's loss; `global_value` turns
        it back into that loss.
        """
        if not self.enabled:
            positives = same_caption_mask(captions, image_emb.device) if captions is not None else None
            return contrastive_loss(image_emb, text_emb, logit_scale, positives)
        sizes = _gather_sizes(len(image_emb), image_emb.device)
        total, first = sum(sizes), sum(sizes[: self.rank])
        all_image, all_text = gather_with_grad(image_emb, sizes), gather_with_grad(text_emb, sizes)
        positives = None
        if captions is not None:
            keys = caption_keys(captions, image_emb.device)
            all_keys = _gather_plain(keys, sizes)
            positives = keys[:, None] == all_keys[None, :]
        local = contrastive_loss(image_emb, text_emb, logit_scale, positives, all_image, all_text, first)
        # This rank's rows carry len/total of the global mean; DDP divides gradients by world_size.
        return local * (len(image_emb) * self.world_size / total)

    def global_value(self, loss: torch.Tensor, pairs: int) -> tuple[float, int]:
        """(the global batch's loss, its number of pairs) from this rank's `loss()` and pair count."""
        if not self.enabled:
            return loss.item(), pairs
        total, count = self.sum(loss.item(), pairs)
        return total / self.world_size, int(count)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


class TrainStep(nn.Module):
    """The trained part of a step as one forward, so DDP sees (and synchronises) every parameter it uses."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image_prefix, text_prefix):
        return self.model.embed_image_prefix(image_prefix), self.model.embed_text_prefix(text_prefix), \
            self.model.logit_scale


# --- collectives with gradients -------------------------------------------------------------

def _gather_sizes(size: int, device) -> list[int]:
    local = torch.tensor([size], device=device if dist.get_backend() == "nccl" else "cpu")
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s) for s in sizes]


def _gather_plain(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's rows concatenated in rank order (rows may differ in number)."""
    padded = F.pad(tensor, [0, 0] * (tensor.dim() - 1) + [0, max(sizes) - len(tensor)])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]):
        ctx.first = sum(sizes[: dist.get_rank()])
        ctx.size = len(tensor)
        return _gather_plain(tensor, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's loss depends on this rank's rows: sum their gradients, keep ours.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.first : ctx.first + ctx.size], None


def gather_with_grad(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All ranks' rows, in rank order; gradients flow back to the rows this rank holds."""
    return _GatherWithGrad.apply(tensor, sizes)


def caption_keys(captions: list[str], device=None) -> torch.Tensor:
    """A 63-bit hash per caption, so ranks can compare captions as one tensor collective."""
    keys = [int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little") >> 1 for c in captions]
    return torch.tensor(keys, dtype=torch.long, device=device)


# --- batch norm over the global batch -------------------------------------------------------

def sync_batch_norm(model: nn.Module) -> int:
    """Make every batch-norm layer normalise by global-batch statistics while training.

    The layers keep their class and state-dict keys (checkpoints stay the same); in eval mode
    (frozen stages, validation, serving) they run as before. Returns the number of layers.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not getattr(module, "_global_stats", False):
            module.forward = functools.partial(_global_batch_norm, module, module.forward)
            module._global_stats = True
            count += 1
    return count


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks; each rank's input moved every rank's output, so its gradient is the sum too."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor):
        out = tensor.clone().contiguous()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone().contiguous()
        dist.all_reduce(grad)
        return grad


def _all_reduce_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    return _AllReduceWithGrad.apply(tensor)


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, local_forward, x: torch.Tensor) -> torch.Tensor:
    if not bn.training or not dist.is_initialized() or dist.get_world_size() == 1:
        return local_forward(x)
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    values = x.float()
    count = _all_reduce_with_grad(values.new_tensor([values.numel() / values.shape[1]]))
    mean = _all_reduce_with_grad(values.sum(dims)) / count
    centred = values - mean.view(shape)
    var = _all_reduce_with_grad((centred * centred).sum(dims)) / count
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
            unbiased = var * count / (count - 1).clamp(min=1)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
    out = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    out = out.to(x.dtype)
    # timm's BatchNormAct2d (EfficientNet) applies its dropout and activation after the norm.
    for after in ("drop", "act"):
        if isinstance(getattr(bn, after, None), nn.Module):
            out = getattr(bn, after)(out)
    return out

"""Image-encoder inference throughput per backbone on this machine: images/s, one table.

    python scripts/bench_backbones.py [--backbones lite0,lite2] [--batch 32] [--steps 5] [--threads 2] [--bf16 auto|on|off]

Each backbone runs at its recipe's input size (EfficientNet-Lite0 at 224 px, Lite2 at 260 px,
ResNet50 at 224 px) through the whole image encoder (what indexing a folder or a live training
step does), eval mode, no grad, on random pixels: in fp32, fp32 channels_last, and bf16
autocast + channels_last. bf16 is only timed where `training.checkpoint.bf16_is_fast` says the
device runs it fast (AMX / AVX512-BF16 on CPU) unless `--bf16 on`; without those instructions
bf16 is emulated and slower than fp32, so the serving and training code do not use it there.
Speed does not depend on weight values: backbones whose weights are missing run randomly
initialised (marked in the table).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.checkpoint import bf16_is_fast  # noqa: E402
from training.model import build_image_encoder  # noqa: E402
from training.pretrained import WeightsUnavailableError  # noqa: E402

BACKBONES = {  # name: (arch, recipe input size)
    "lite0": ("tf_efficientnet_lite0", 224),
    "lite2": ("tf_efficientnet_lite2", 260),
    "resnet50": ("resnet50", 224),
}


def build(arch: str):
    cfg = OmegaConf.create({"arch": arch, "weights_path": None, "trainable_stages": 0, "pooled_stages": 1})
    try:
        encoder, _ = build_image_encoder(cfg, pretrained=True)
        weights = "pretrained"
    except WeightsUnavailableError:
        encoder, _ = build_image_encoder(cfg, pretrained=False)
        weights = "random init (weights not on this machine)"
    return encoder.eval(), weights


@torch.no_grad()
def images_per_second(encoder, pixels: torch.Tensor, steps: int, bf16: bool) -> float:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        encoder(pixels)  # warm-up (allocations, oneDNN kernel choice)
        start = time.perf_counter()
        for _ in range(steps):
            encoder(pixels)
    return pixels.shape[0] * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default="lite0,lite2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fast = bf16_is_fast(torch.device("cpu"))
    use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and fast)
    modes = [("fp32", False, False), ("fp32 channels_last", True, False)]
    if use_bf16:
        modes.append(("bf16 autocast + channels_last", True, True))
    print(f"CPU, {args.threads} threads, batch {args.batch}, {args.steps} timed steps; "
          f"bf16 fast on this CPU (AMX/AVX512-BF16): {'yes' if fast else 'no'}")
    rows = []
    for name in args.backbones.split(","):
        arch, size = BACKBONES[name]
        encoder, weights = build(arch)
        pixels = torch.randn(args.batch, 3, size, size)
        params = sum(p.numel() for p in encoder.parameters()) / 1e6
        for mode, channels_last, bf16 in modes:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            encoder.to(memory_format=fmt)
            speed = images_per_second(encoder, pixels.contiguous(memory_format=fmt), args.steps, bf16)
            rows.append((name, f"{size}", f"{params:.1f}M", mode, f"{speed:.1f}", weights))
            print(f"  {name} {mode}: {speed:.1f} img/s", file=sys.stderr, flush=True)
    header = ("backbone", "px", "params", "precision", "img/s", "weights")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + " |")
    if not use_bf16:
        print("bf16 not timed: this CPU has no AMX/AVX512-BF16 (pass --bf16 on to time the emulated path)")


if __name__ == "__main__":
    main()

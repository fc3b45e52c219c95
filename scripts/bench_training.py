"""Training throughput per recipe on this machine: samples/s for a full train step.

    python scripts/bench_training.py [--recipes tiny,effnet_minilm,resnet50_bert] [--batch 16] [--steps 5]

Each recipe is timed as configured (its frozen stages frozen), on random pixels and real
captions, in fp32 and bf16 autocast (channels_last), both as a live step (images through the
whole image encoder) and as a cached-prefix step (what `trainer.cache_features=true` runs).
Speed does not depend on weight values, so recipes whose pretrained weights are not on this
machine are timed with the same architecture, randomly initialised (marked in the output).
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

from training.loss import contrastive_loss  # noqa: E402
from training.model import build_model  # noqa: E402
from training.pretrained import WeightsUnavailableError, minilm_tokenizer  # noqa: E402

CAPTIONS = ["a dog running on a beach at sunset", "red apple", "a star polygon with 71 points, shapes",
            "two people walking in the snow near a mountain lake"]


def build(recipe: str):
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "model" / f"{recipe}.yaml")
    try:
        model, tokenizer = build_model(cfg)
        pretrained = cfg.image.pretrained or cfg.text.pretrained
        return model, tokenizer, cfg, "pretrained" if pretrained else "random init (test recipe)"
    except WeightsUnavailableError:
        from transformers import BertConfig

        # bert-base-uncased's shape by default; all-MiniLM-L6-v2's for the MiniLM recipe.
        bert = BertConfig(hidden_size=384, num_hidden_layers=6, intermediate_size=1536) if recipe == "effnet_minilm" \
            else BertConfig()
        cfg.image.pretrained = False
        model, _ = build_model(cfg, pretrained=False, bert_config=bert.to_dict())
        return model, minilm_tokenizer(), cfg, "random init (weights not on this machine)"


def time_steps(step, steps: int) -> float:
    step()  # warm-up (allocations, oneDNN kernel choice)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def bench(recipe: str, batch: int, steps: int) -> list[tuple]:
    model, tokenizer, cfg, weights = build(recipe)
    model.train().to(memory_format=torch.channels_last)
    size = cfg.image.image_size
    pixels = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    tokens = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)], padding=True, truncation=True,
                       max_length=cfg.text.max_tokens, return_tensors="pt")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    with torch.no_grad():
        image_prefix = model.image_encoder.forward_prefix(pixels)
        text_prefix = model.text_encoder.forward_prefix(tokens["input_ids"], tokens["attention_mask"])
    rows = []
    for precision in ("fp32", "bf16"):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

        def live_step():
            with autocast:
                image = model.encode_image(pixels)
                text = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
            contrastive_loss(image, text, model.logit_scale).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def cached_step():
            with autocast:
                image = model.embed_image_prefix(image_prefix)
                text = model.embed_text_prefix(text_prefix)
            contrastive_loss(image, text, model.logit_scale).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for mode, step in (("live", live_step), ("cached prefix", cached_step)):
            seconds = time_steps(step, steps)
            rows.append((recipe, weights, precision, mode, batch, seconds, batch / seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="tiny,effnet_minilm,resnet50_bert")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    amx = "amx_bf16" in Path("/proc/cpuinfo").read_text()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, AMX bf16: {amx}")
    print(f"| recipe | weights | precision | step | batch | s/step | samples/s |")
    print(f"| --- | --- | --- | --- | --- | --- | --- |")
    for recipe in args.recipes.split(","):
        for row in bench(recipe, args.batch, args.steps):
            print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} | {row[4]} | {row[5]:.3f} | {row[6]:.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""Compare ways to run a checkpoint's encoders on this CPU, each checked against eager fp32.

    python scripts/bench_encoders.py --checkpoint runs/oc_robust/best [--batch 32] [--seconds 6]

Image encoder (images/s at batch `--batch` on all cores): eager fp32, eager fp32 channels_last
(the eager serving path), eager bf16 autocast (only where `bf16_is_fast`: AMX or AVX512-BF16;
elsewhere bf16 is emulated and ~100x slower), torch.compile of the channels_last model, and
ONNX Runtime (the export `serving.onnx_export` makes and the server uses).
Text encoder (one query, CPU ms; and a batch of 8): eager fp32 on 1 and 2 threads, ONNX
Runtime on 1 thread, and ONNX Runtime with int8 dynamic quantisation.

Every variant's embeddings are compared with eager fp32 on the same inputs; the lowest cosine
is printed next to its speed, and only variants at >= 0.999 may be used (issue 10).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUERY = "a photo of a mountain lake at sunset"


def rate(run, batch: int, seconds: float) -> float:
    run()
    reps, started = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - started < seconds:
        run()
        reps += 1
    return reps * batch / (time.perf_counter() - started)


def cpu_ms(run, reps: int = 60) -> float:
    run()
    started = time.process_time()
    for _ in range(reps):
        run()
    return (time.process_time() - started) / reps * 1000


def wall_ms(run, reps: int = 60) -> float:
    run()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0, help="timing window per image variant")
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile (slow to compile)")
    args = parser.parse_args()

    import torch

    from serving.onnx_encoder import TEXT_FILE, OnnxEncoders, _session
    from serving.onnx_export import cosines, ensure_export, probe_images
    from training.checkpoint import bf16_is_fast, load_checkpoint

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    checkpoint = args.checkpoint.expanduser().resolve()
    loaded = load_checkpoint(checkpoint, device="cpu", bf16=False)
    model = loaded.model
    export_dir = ensure_export(checkpoint)
    onnx = OnnxEncoders(export_dir, checkpoint, image_threads=cores, text_threads=1)
    print(f"checkpoint {checkpoint} (model {loaded.model_id}); {cores} cores; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"bf16 fast on this CPU (AMX / AVX512-BF16): {bf16_is_fast(torch.device('cpu'))}")

    # ------------------------------------------------------------------ image encoder
    size = loaded.preprocessing.image_size
    probe = [onnx.transform(image) for image in probe_images()]
    noise = np.random.default_rng(0).standard_normal((args.batch - len(probe), 3, size, size)).astype(np.float32)
    pixels_np = np.concatenate([np.stack(probe), noise])
    pixels = torch.from_numpy(pixels_np)
    contiguous = pixels.contiguous()

    @torch.inference_mode()
    def eager_plain():
        return model.encode_image(contiguous).float()

    rows = []
    with torch.inference_mode():
        model.to(memory_format=torch.contiguous_format)
        reference = eager_plain().numpy()
        rows.append(("eager fp32 (NCHW)", rate(eager_plain, args.batch, args.seconds), 1.0))
        model.to(memory_format=torch.channels_last)
        cl = pixels.to(memory_format=torch.channels_last)
        eager_cl = lambda: model.encode_image(cl).float()  # noqa: E731
        rows.append(("eager fp32 channels_last", rate(eager_cl, args.batch, args.seconds),
                     cosines(reference, eager_cl().numpy()).min()))
        if bf16_is_fast(torch.device("cpu")):
            def eager_bf16():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model.encode_image(cl).float()

            rows.append(("eager bf16 autocast channels_last", rate(eager_bf16, args.batch, args.seconds),
                         cosines(reference, eager_bf16().numpy()).min()))
        else:
            rows.append(("eager bf16 autocast channels_last", None, None))
    if not args.skip_compile:
        started = time.perf_counter()
        try:
            compiled = torch.compile(model.encode_image)
            with torch.inference_mode():
                out = compiled(cl).float().numpy()
                compile_s = time.perf_counter() - started
                rows.append((f"torch.compile channels_last (compiled in {compile_s:.0f} s)",
                             rate(lambda: compiled(cl), args.batch, args.seconds), cosines(reference, out).min()))
        except Exception as error:  # a missing compiler, an unsupported op: say so and go on
            rows.append((f"torch.compile: failed ({type(error).__name__}: {str(error)[:80]})", None, None))
    rows.append((f"ONNX Runtime fp32 ({cores} threads)", rate(lambda: onnx.embed_images(pixels_np), args.batch, args.seconds),
                 cosines(reference, onnx.embed_images(pixels_np)).min()))

    print()
    print(f"IMAGE ENCODER  batch {args.batch}, {size} px, {cores} threads ({len(probe)} probe pictures + noise)")
    print("| variant | images/s | vs eager fp32 channels_last | min cosine to eager fp32 |")
    print("| --- | ---: | ---: | ---: |")
    base = rows[1][1]
    for name, ips, cos in rows:
        if ips is None:
            print(f"| {name} | not run: bf16 is emulated on this CPU (no AMX / AVX512-BF16) | | |" if "bf16" in name
                  else f"| {name} | | | |")
            continue
        print(f"| {name} | {ips:.1f} | {ips / base:.2f}x | {cos:.6f} |")

    # ------------------------------------------------------------------ text encoder
    from serving.onnx_export import PROBE_TEXTS

    tokens = loaded.tokenize([QUERY])
    eight = PROBE_TEXTS[:8]
    with torch.inference_mode():
        reference = loaded.embed_texts(PROBE_TEXTS).numpy()
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            one = lambda: model.encode_text(tokens["input_ids"], tokens["attention_mask"])  # noqa: E731
            results.append((f"eager fp32, {threads} thread{'s' if threads > 1 else ''}", wall_ms(one), cpu_ms(one),
                            wall_ms(lambda: loaded.embed_texts(eight), 20) / 8, 1.0))
    served = np.concatenate([onnx.embed_texts([t]) for t in PROBE_TEXTS])
    results.append(("ONNX Runtime fp32, 1 thread", wall_ms(lambda: onnx.embed_texts([QUERY])),
                    cpu_ms(lambda: onnx.embed_texts([QUERY])), wall_ms(lambda: onnx.embed_texts(eight), 20) / 8,
                    cosines(reference, served).min()))
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as tmp:
            quantize_dynamic(str(export_dir / TEXT_FILE), f"{tmp}/text_int8.onnx", weight_type=QuantType.QInt8)
            int8 = _session(Path(tmp) / "text_int8.onnx", 1, arena=True)
            run8 = lambda texts: int8.run(None, onnx.tokenize(texts))[0]  # noqa: E731
            served8 = np.concatenate([run8([t]) for t in PROBE_TEXTS])
            results.append(("ONNX Runtime int8 dynamic, 1 thread", wall_ms(lambda: run8([QUERY])),
                            cpu_ms(lambda: run8([QUERY])), wall_ms(lambda: run8(eight), 20) / 8,
                            cosines(reference, served8).min()))
    except Exception as error:
        print(f"(int8 quantisation not measured: {type(error).__name__}: {error})")
    print()
    print(f"TEXT ENCODER  one query ({QUERY!r}); batch of 8 probe texts ({len(PROBE_TEXTS)} probe texts for the cosine)")
    print("| variant | one query, ms (median wall) | one query, CPU ms | batch of 8, ms per query | min cosine to eager fp32 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, wall, cpu, per8, cos in results:
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {per8:.1f} | {cos:.6f} |")
    print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()

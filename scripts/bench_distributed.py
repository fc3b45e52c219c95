"""Past one process: search throughput with 1 and 2 gallery workers on a Chroma server, and the
DDP training step rate with 1 and 2 processes.

    python scripts/bench_distributed.py [--checkpoint runs/oc_robust/best] [--images 10000]
                                        [--seconds 20] [--concurrency 8] [--part search|ddp|all]

SEARCH: starts `chroma run` on a free loopback port, one gallery worker (`python -m serving ...
store=server`), fills one gallery with --images records (random unit vectors; each record is a
hard link to one real picture, so searches find their files), then `--concurrency` keep-alive
clients send POST /images/search for --seconds against 1 worker, then against 2 (round robin).
Besides requests/s it reads the CPU-seconds each part used (/proc), so the cost of one search in
the worker and in the Chroma server is known: that is what the scaling calculation needs.

DDP: `torchrun --nproc_per_node=P -m training.train experiment=tiny` for P = 1 and 2 with the
same global batch, live images (decode + encoder) and cached prefixes (heads only: almost all
communication), samples/s read from metrics.csv.

What a machine with few cores can show: processes share the same cores, so the figures measure
the overhead of going distributed, not a speed-up. The speed-up on real hardware follows from the
measured per-request and per-step costs; docs/deploy.md states it as a calculation.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from tests.chroma_fixtures import ChromaServer  # noqa: E402
from tests.serving_fixtures import ServerProcess, descendants, tiny_checkpoint, write_image  # noqa: E402

QUERIES = ["a red apple", "a dog on a beach at sunset", "two people walking", "a black and white cat", "mountains",
           "a car in the snow", "birthday cake with candles", "a sailing boat", "an old building", "flowers"]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICKS


def family(proc) -> set[int]:
    return {proc.pid} | descendants(proc.pid)


# ---------------------------------------------------------------------------------- search

def fill_gallery(chroma: ChromaServer, user_id: str, picture: Path, count: int, folder: Path) -> None:
    """`count` records of random unit vectors, each a hard link to `picture` (a real, distinct path)."""
    from serving.store import GalleryStore, ImageRecord, image_id
    from serving.store_backend import ServerBackend

    store = GalleryStore(folder, backend=ServerBackend(chroma.host, chroma.port))
    user = store.get_user(user_id)
    dim = len(store.get_embedding(user, store.list_records(user, 0, 1)[0].id))
    links = folder / "links"
    links.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    stat = picture.stat()
    for start in range(0, count, 2000):
        records = []
        for index in range(start, min(count, start + 2000)):
            path = links / f"p{index:07d}.jpg"
            if not path.exists():
                os.link(picture, path)
            records.append(ImageRecord(image_id(str(path)), str(path), stat.st_size, stat.st_mtime_ns,
                                       f"{index:064x}", time.time()))
        vectors = rng.standard_normal((len(records), dim)).astype(np.float32)
        store.upsert(user, records, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    store.close()


def chroma_cost_per_call(chroma: ChromaServer, user_id: str, folder: Path, calls: int = 300) -> dict:
    """Chroma-server CPU ms of each request a search makes (registry lookup, count, top-10 query)."""
    from serving.store import GalleryStore
    from serving.store_backend import ServerBackend

    store = GalleryStore(folder, backend=ServerBackend(chroma.host, chroma.port))
    user = store.get_user(user_id)
    vector = store.get_embedding(user, store.list_records(user, 0, 1)[0].id)
    costs = {}
    for name, call in (("registry lookup", lambda: store.get_user(user_id)), ("count", lambda: store.count(user)),
                       ("query top 10", lambda: store.query(user, vector, 10))):
        before = cpu_seconds(family(chroma.proc))
        for _ in range(calls):
            call()
        costs[name] = 1000 * (cpu_seconds(family(chroma.proc)) - before) / calls
    store.close()
    print("Chroma CPU ms per call: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()), flush=True)
    return costs


def load(urls: list[str], user_id: str, seconds: float, concurrency: int) -> dict:
    latencies: list[float] = []
    errors = [0]
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client(number: int) -> None:
        with httpx.Client(timeout=60) as http:
            sent = 0
            while time.monotonic() < stop:
                url = urls[(number + sent) % len(urls)]
                body = {"query": QUERIES[(number * 7 + sent) % len(QUERIES)], "top_k": 10}
                began = time.perf_counter()
                response = http.post(f"{url}/images/search?user_id={user_id}", json=body)
                took = time.perf_counter() - began
                with lock:
                    if response.status_code == 200:
                        latencies.append(took)
                    else:
                        errors[0] += 1
                sent += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(concurrency)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - began
    latencies.sort()
    return {"requests": len(latencies), "errors": errors[0], "wall_s": wall, "per_s": len(latencies) / wall,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))]}


def bench_search(args, base: Path) -> dict:
    checkpoint = Path(args.checkpoint).resolve() if args.checkpoint else tiny_checkpoint(1)[0]
    picture = write_image(base / "pictures" / "one.jpg", 1, size=(320, 240))
    chroma = ChromaServer(base / "chroma").wait_ready()
    workers: list[ServerProcess] = []
    results: dict = {"checkpoint": str(checkpoint), "images": args.images, "concurrency": args.concurrency,
                     "seconds": args.seconds, "cores": os.cpu_count(), "runs": []}
    try:
        for name in ("a", "b"):
            (base / f"cwd-{name}").mkdir()
        first = ServerProcess(checkpoint, base / "db-a", base / "cwd-a", *chroma.overrides,
                              f"torch_threads={args.torch_threads}").wait_ready(180)
        workers.append(first)
        init = httpx.post(f"{first.url}/db/initialize", json={"user_name": "bench"}, timeout=60).json()
        user_id = init["user_id"]
        added = httpx.post(f"{first.url}/images/add?user_id={user_id}", json={"image_path": str(picture)}, timeout=60)
        assert added.status_code == 200, added.text
        began = time.monotonic()
        fill_gallery(chroma, user_id, picture, args.images - 1, base / "fill")
        results["fill_s"] = time.monotonic() - began
        results["chroma_cpu_ms_per_call"] = chroma_cost_per_call(chroma, user_id, base / "fill")
        for count in (1, 2):
            if count == 2:
                workers.append(ServerProcess(checkpoint, base / "db-b", base / "cwd-b", *chroma.overrides,
                                             f"torch_threads={args.torch_threads}").wait_ready(180))
            urls = [w.url for w in workers]
            load(urls, user_id, 3, args.concurrency)  # warm-up: connections, caches, HNSW in memory
            pids = {"workers": set().union(*(family(w.proc) for w in workers)), "chroma": family(chroma.proc),
                    "clients": {os.getpid()}}
            before = {part: cpu_seconds(p) for part, p in pids.items()}
            run = load(urls, user_id, args.seconds, args.concurrency)
            run["cpu_s"] = {part: cpu_seconds(p) - before[part] for part, p in pids.items()}
            run["cpu_ms_per_search"] = {part: 1000 * s / max(1, run["requests"]) for part, s in run["cpu_s"].items()}
            run["workers"] = count
            run["loadavg_after"] = os.getloadavg()[0]
            results["runs"].append(run)
            print(f"search, {count} worker(s): {run['per_s']:.1f} searches/s, p50 {run['p50_ms']:.1f} ms, "
                  f"p99 {run['p99_ms']:.1f} ms, errors {run['errors']}; CPU ms per search: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in run["cpu_ms_per_search"].items())
                  + f"; load average {run['loadavg_after']:.1f} on {os.cpu_count()} cores", flush=True)
    finally:
        for worker in workers:
            worker.stop()
        chroma.stop()
    return results


# ---------------------------------------------------------------------------------- ddp

def train_rate(csv_path: Path, run_dir: Path, processes: int, batch: int, steps: int, extra: list[str],
               threads: int | None = None) -> float:
    """Samples/s of `torchrun --nproc_per_node=processes -m training.train` (mean over its epochs)."""
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or max(1, cores // processes))}
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={processes}",
               "-m", "training.train", "experiment=tiny", f"data.csv={csv_path}", f"trainer.batch_size={batch}",
               f"trainer.max_steps={steps}", "trainer.max_epochs=1000", "trainer.device=cpu",
               "data.split_fractions=[1.0,0.0,0.0]", f"hydra.run.dir={run_dir}", *extra]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return statistics.mean(float(r["samples_per_s"]) for r in rows)  # global samples per second


def bench_ddp(args, base: Path) -> dict:
    from data.fixtures import make_shapes_dataset

    csv_path = make_shapes_dataset(base / "shapes", count=args.ddp_images, size=64)
    cores = len(os.sched_getaffinity(0))
    results = {"batch": args.ddp_batch, "steps": args.ddp_steps, "cores": cores,
               "threads_per_process": args.threads_per_process or "cores / processes", "runs": []}
    for mode, extra in (("live images", ["trainer.cache_features=false"]),
                        ("cached prefixes", ["trainer.cache_features=true"])):
        for processes in (1, 2):
            rates = [train_rate(csv_path, base / f"ddp-{processes}-{mode.split()[0]}-{repeat}", processes,
                                args.ddp_batch, args.ddp_steps, extra, args.threads_per_process)
                     for repeat in range(args.repeats)]
            rate = statistics.median(rates)
            run = {"mode": mode, "processes": processes, "samples_per_s": rate, "steps_per_s": rate / args.ddp_batch,
                   "all_samples_per_s": rates, "loadavg_after": os.getloadavg()[0]}
            results["runs"].append(run)
            print(f"ddp, {mode}, {processes} process(es): {rate:.1f} samples/s = {run['steps_per_s']:.2f} steps/s "
                  f"(global batch {args.ddp_batch}; median of {[round(r, 1) for r in rates]}; "
                  f"load average {run['loadavg_after']:.1f} on {cores} cores)", flush=True)
    return results


# ---------------------------------------------------------------------------------- one step

def bench_step(args) -> dict:
    """One process's live train step of a recipe (random weights of the real architecture) and the
    size of its gradient, the two numbers the DDP scaling calculation needs (docs/deploy.md)."""
    import torch
    from omegaconf import OmegaConf
    from transformers import BertConfig

    from training.loss import contrastive_loss
    from training.model import build_model

    cfg = OmegaConf.load(REPO / "configs" / "model" / f"{args.recipe}.yaml")
    bert = BertConfig() if cfg.text.arch == "bert" else None  # bert-base-uncased's shape
    if bert is None:
        model, _ = build_model(cfg)
    else:
        model, _ = build_model(cfg, pretrained=False, bert_config=bert.to_dict())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    size, batch = cfg.image.image_size, args.step_batch
    pixels = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    ids = torch.randint(1000, 20000, (batch, cfg.text.max_tokens), device=device)
    mask = torch.ones_like(ids)
    bf16 = device.type == "cuda" or args.bf16

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                image_prefix = model.image_encoder.forward_prefix(pixels)
                text_prefix = model.text_encoder.forward_prefix(ids, mask)
            image, text = model.embed_image_prefix(image_prefix), model.embed_text_prefix(text_prefix)
        contrastive_loss(image, text, model.logit_scale).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    began = time.perf_counter()
    for _ in range(args.step_count):
        step()
    sync()
    seconds = (time.perf_counter() - began) / args.step_count
    gradient = sum(p.numel() for p in params)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    result = {"recipe": args.recipe, "device": name, "batch": batch, "bf16": bf16, "s_per_step": seconds,
              "samples_per_s": batch / seconds, "trainable_parameters": gradient,
              "gradient_mb_fp32": 4 * gradient / 1e6}
    print(f"step, {args.recipe} on {name}, batch {batch}{' bf16' if bf16 else ''}: {1000 * seconds:.1f} ms/step "
          f"= {batch / seconds:.0f} samples/s; {gradient / 1e6:.1f} M trained parameters "
          f"({4 * gradient / 1e6:.0f} MB of fp32 gradient to all-reduce per step)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("search", "ddp", "step", "all"), default="all",
                        help="all = search and ddp; step = one process's train step of --recipe (on a GPU if any)")
    parser.add_argument("--recipe", default="resnet50_bert", help="--part step: a configs/model/ recipe")
    parser.add_argument("--step-batch", type=int, default=256)
    parser.add_argument("--step-count", type=int, default=20)
    parser.add_argument("--bf16", action="store_true", help="--part step on CPU: bf16 autocast")
    parser.add_argument("--checkpoint", help="a checkpoint folder (default: a random tiny one)")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per gallery worker")
    parser.add_argument("--ddp-images", type=int, default=512)
    parser.add_argument("--ddp-batch", type=int, default=32)
    parser.add_argument("--ddp-steps", type=int, default=32)
    parser.add_argument("--threads-per-process", type=int, help="OMP threads per trainer (default: cores / processes)")
    parser.add_argument("--repeats", type=int, default=3, help="DDP runs per setting (the median is reported)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as scratch:
        base = Path(scratch)
        if args.part in ("search", "all"):
            results["search"] = bench_search(args, base)
        if args.part in ("ddp", "all"):
            results["ddp"] = bench_ddp(args, base)
        if args.part == "step":
            results["step"] = bench_step(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

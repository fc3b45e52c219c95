"""Benchmark the gallery server through its real HTTP API.

    python scripts/bench_serving.py [--checkpoint DIR] [--images 200] [--sizes 10000,100000]

Prints:
- ingest throughput (images/s) of POST /images/add-folder on a folder of generated 12-megapixel
  JPEGs (smooth colour fields with per-pixel grain: ~3 MB each, so they cost what a photo costs
  to decode), next to the bound this machine allows, measured in the same run:
      bound = cores / (t_decode + cores / inference_ips)
  t_decode: one core's seconds to decode and resize one of these images (JPEG draft + the
  checkpoint's transform); inference_ips: batched image-encoder throughput on all cores.
  (Each image costs t_decode core-seconds of decoding plus cores/ips core-seconds of inference.)
- search latency p50/p99 over HTTP (POST /images/search, top_k=10, one client, keep-alive) at
  each gallery size; the large galleries are filled with random unit vectors directly through
  the store before the server starts (the store has a single owner).
- the server's memory: RSS and PSS of each of its processes.

Without --checkpoint a tiny random-init checkpoint is made (fast, tiny model: ingest is then
decode-bound). The default run takes a few minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_NOISE = None


def make_photo(args) -> int:
    """One unique 12 MP JPEG: a smooth random colour field plus grain. Returns its size in bytes."""
    global _NOISE
    path, seed, width, height = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    if _NOISE is None or _NOISE.shape != (height + 64, width + 64):
        _NOISE = np.random.default_rng(0).integers(-10, 11, (height + 64, width + 64), dtype=np.int16)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
    dy, dx = rng.integers(0, 64, 2)
    pixels += _NOISE[dy:dy + height, dx:dx + width, None]
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    return os.path.getsize(path)


def generate_images(folder: Path, count: int, width: int, height: int, workers: int) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"photo_{i:04d}.jpg", 10_000 + i, width, height) for i in range(count)]
    with ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(make_photo, jobs, chunksize=4))
    return sum(sizes) / len(sizes) / 1e6


def cores() -> int:
    return len(os.sched_getaffinity(0))


def measure_bound(checkpoint: Path, images: list[Path], batch_size: int) -> dict:
    """t_decode on one core, batched inference images/s on all cores, and the bound they imply."""
    import torch

    from data.images import load_image
    from serving.embedder import Embedder

    n = cores()
    embedder = Embedder(str(checkpoint), threads=n)
    size = embedder.preprocessing.image_size
    torch.set_num_threads(1)
    sample = images[: min(len(images), 24)]
    embedder.transform(load_image(sample[0], min_size=size))  # warm-up
    started, cpu = time.perf_counter(), time.thread_time()
    for path in sample:
        embedder.transform(load_image(path, min_size=size))
    t_decode = (time.perf_counter() - started) / len(sample)
    t_decode_cpu = (time.thread_time() - cpu) / len(sample)

    torch.set_num_threads(n)
    pixels = torch.randn(batch_size, 3, size, size)
    embedder.embed_images(pixels)
    reps, started, cpu = 0, time.perf_counter(), time.process_time()
    while reps < 3 or time.perf_counter() - started < 3.0:
        embedder.embed_images(pixels)
        reps += 1
    ips = reps * batch_size / (time.perf_counter() - started)
    infer_cpu = (time.process_time() - cpu) / (reps * batch_size)
    embedder.close()
    del embedder
    gc.collect()
    return {"cores": n, "t_decode_s": t_decode, "inference_ips": ips, "bound_ips": n / (t_decode + n / ips),
            "image_size": size, "t_decode_cpu_s": t_decode_cpu, "infer_cpu_s": infer_cpu}


def machine_busy_seconds() -> float:
    """CPU-seconds all processes have used (non-idle time in /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def family_cpu_seconds(pids) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total + sum(os.times()[:2])  # and this process


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fill_store(db: Path, model_id: str, dim: int, sizes: list[int]) -> dict:
    """Galleries of random unit vectors, written through the store while no server runs."""
    from serving.store import GalleryStore, ImageRecord, image_id

    users, rates = {}, {}
    rng = np.random.default_rng(0)
    with GalleryStore(db) as store:
        for size in sizes:
            user, _ = store.get_or_create_user(f"bench_{size}", model_id)
            started, chunk = time.perf_counter(), 5000
            for start in range(0, size, chunk):
                count = min(chunk, size - start)
                vectors = rng.standard_normal((count, dim)).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                records = []
                for i in range(start, start + count):
                    path = f"/bench/{size}/d{i // 1000:03d}/img_{i:07d}.jpg"
                    records.append(ImageRecord(image_id(path), path, 1, 1, f"{size}-{i}", 0.0))
                store.upsert(user, records, vectors)
            rates[size] = size / (time.perf_counter() - started)
            users[size] = user.user_id
    return {"users": users, "insert_per_s": rates}


def process_memory(pid: int) -> list[dict]:
    from tests.serving_fixtures import descendants  # /proc walk

    rows = []
    for p in [pid, *sorted(descendants(pid))]:
        try:
            status = Path(f"/proc/{p}/status").read_text()
            rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
            pss_line = next((line for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
                             if line.startswith("Pss:")), "Pss: 0 kB")
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:60]
        except (OSError, StopIteration):
            continue
        rows.append({"pid": p, "rss_mb": rss / 1024, "pss_mb": int(pss_line.split()[1]) / 1024, "cmd": cmd})
    return rows


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: a tiny random one)")
    parser.add_argument("--images", type=int, default=200, help="12 MP JPEGs to ingest")
    parser.add_argument("--resolution", default="4000x3000")
    parser.add_argument("--sizes", default="10000,100000", help="gallery sizes for search latency")
    parser.add_argument("--queries", type=int, default=200, help="timed searches per size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workdir", type=Path, help="keep images and store here (default: a temp folder, removed)")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.checkpoint:
        args.checkpoint = args.checkpoint.expanduser().resolve()  # the server runs in another folder

    import httpx

    from tests.serving_fixtures import alive, descendants, free_port

    width, height = (int(v) for v in args.resolution.lower().split("x"))
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    db, image_dir = work / "db", work / "images"
    if db.exists():
        shutil.rmtree(db)
    print(f"bench_serving: work folder {work}, {cores()} cores", flush=True)

    checkpoint = args.checkpoint
    if checkpoint is None:
        from tests.serving_fixtures import make_checkpoint

        checkpoint = work / "tiny-checkpoint"
        make_checkpoint(checkpoint, seed=0)
    config = json.loads((checkpoint / "config.json").read_text())
    model_id = config["model_id"]

    existing = sorted(image_dir.glob("photo_*.jpg")) if image_dir.exists() else []
    if len(existing) != args.images:
        shutil.rmtree(image_dir, ignore_errors=True)
        started = time.perf_counter()
        mean_mb = generate_images(image_dir, args.images, width, height, cores())
        print(f"generated {args.images} {width}x{height} JPEGs (mean {mean_mb:.1f} MB) in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    images = sorted(image_dir.glob("photo_*.jpg"))

    bound = measure_bound(checkpoint, images, args.batch_size)
    dim = int(config["model"]["embed_dim"])
    started = time.perf_counter()
    filled = fill_store(db, model_id, dim, sizes) if sizes else {"users": {}, "insert_per_s": {}}
    fill_s = time.perf_counter() - started

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "serving", f"checkpoint={checkpoint}", f"db_path={db}", f"port={port}",
         "log_level=warning", f"ingest.batch_size={args.batch_size}"],
        cwd=work, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT,
    )
    family: set[int] = set()
    try:
        started = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited: see {work / 'server.log'}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        startup_s = time.perf_counter() - started
        family = descendants(server.pid)
        client = httpx.Client(base_url=url, timeout=600)

        worker = next(p for p in family if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes())
        uid = client.post("/db/initialize", json={"user_name": "bench_ingest"}).json()["user_id"]
        pids = [server.pid, *family]
        busy, ours = machine_busy_seconds(), family_cpu_seconds(pids)
        started, cpu = time.perf_counter(), cpu_seconds(worker)
        report = client.post("/images/add-folder", params={"user_id": uid}, json={"folder_path": str(image_dir)})
        ingest_s = time.perf_counter() - started
        ingest_cpu = cpu_seconds(worker) - cpu
        others_cpu = max(0.0, (machine_busy_seconds() - busy) - (family_cpu_seconds(pids) - ours))
        report.raise_for_status()
        report = report.json()
        ingest_ips = report["added"] / ingest_s
        started = time.perf_counter()
        readd = client.post("/images/add-folder", params={"user_id": uid}, json={"folder_path": str(image_dir)}).json()
        readd_s = time.perf_counter() - started

        words = ["beach", "sunset", "dog", "city street", "mountain lake", "birthday cake", "red car", "forest"]
        latencies = {}
        for size in sizes:
            user_id = filled["users"][size]
            for i in range(10):  # warm-up
                client.post("/images/search", params={"user_id": user_id}, json={"query": words[i % len(words)]})
            times = []
            for i in range(args.queries):
                query = f"a photo of a {words[i % len(words)]} number {i}"
                started = time.perf_counter()
                response = client.post("/images/search", params={"user_id": user_id}, json={"query": query, "top_k": 10})
                times.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200 and len(response.json()["results"]) == 10, response.text
            latencies[size] = times
        memory = process_memory(server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    leftover = [p for p in family if alive(p)]
    print()
    print(f"checkpoint {checkpoint} (model {model_id}, embed dim {dim}, image size {bound['image_size']})")
    print(f"server startup to /health 200: {startup_s:.1f} s")
    print()
    print(f"INGEST  POST /images/add-folder, {report['added']} x {width}x{height} JPEG "
          f"(added {report['added']}, failed {report['failed']}):")
    print(f"  measured   {ingest_ips:7.1f} images/s   ({ingest_s:.1f} s wall, client side)")
    print(f"  bound      {bound['bound_ips']:7.1f} images/s   = {bound['cores']} cores / ({bound['t_decode_s'] * 1000:.1f} ms "
          f"decode+resize on one core + {bound['cores']} / {bound['inference_ips']:.0f} img/s batched inference)")
    print(f"  ratio      {100 * ingest_ips / bound['bound_ips']:7.1f} % of the bound (target >= 80 %)")
    ideal_cpu = bound["t_decode_cpu_s"] + bound["infer_cpu_s"]
    worker_cpu = ingest_cpu / max(1, report["added"])
    others_share = others_cpu / (bound["cores"] * ingest_s)
    print(f"  CPU cost   {worker_cpu * 1000:7.1f} ms per image in the worker (all threads) vs {ideal_cpu * 1000:.1f} ms "
          f"for decode+resize and inference measured alone: pipeline overhead {100 * (worker_cpu / ideal_cpu - 1):+.0f} %")
    print(f"  other processes on this machine used {others_cpu:.1f} of the {bound['cores'] * ingest_s:.1f} core-seconds "
          f"during the ingest ({100 * others_share:.0f} %; the bound assumes 0 %)")
    if others_share > 0.05:
        print(f"  estimate   {100 * ingest_ips / (bound['bound_ips'] * max(0.05, 1 - others_share)):7.1f} % of the bound scaled "
              f"to the CPU share left to the server (rerun on an idle machine for a clean figure)")
    print(f"  re-adding the unchanged folder: {readd_s * 1000:.0f} ms ({readd['unchanged']} unchanged)")
    print()
    print("SEARCH  POST /images/search top_k=10, sequential, one keep-alive client:")
    for size in sizes:
        times = latencies[size]
        print(f"  {size:>7} images: p50 {percentile(times, 50):6.1f} ms   p99 {percentile(times, 99):6.1f} ms   "
              f"({len(times)} queries; store filled at {filled['insert_per_s'][size]:.0f} vectors/s)")
    if sizes:
        print(f"  (filling the store took {fill_s:.0f} s)")
    print()
    print("MEMORY  server processes after the runs above:")
    for row in memory:
        print(f"  pid {row['pid']:>7}  RSS {row['rss_mb']:7.1f} MB  PSS {row['pss_mb']:7.1f} MB  {row['cmd']}")
    print(f"  total   RSS {sum(r['rss_mb'] for r in memory):7.1f} MB  PSS {sum(r['pss_mb'] for r in memory):7.1f} MB")
    print(f"shutdown (SIGINT): exit code {server.returncode}, processes left: {leftover or 'none'}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

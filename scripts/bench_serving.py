"""Benchmark the gallery server through its real HTTP API: every figure of issue 10 in one run.

    python scripts/bench_serving.py --checkpoint runs/oc_robust/best [--images 200] [--sizes 10000,100000]

Prints, each with its target in the SUMMARY at the end (results: docs/benchmarks.md):
- ingest throughput (images/s) of POST /images/add-folder on a folder of generated 12-megapixel
  JPEGs (smooth colour fields with per-pixel grain: ~3 MB each, so they cost what a photo costs
  to decode), next to the bound this machine allows, measured in the same run with the
  server's own encoder (ONNX Runtime on CPU):
      bound = cores / (t_decode + cores / inference_ips)
  t_decode: one core's seconds to decode and resize one of these images (JPEG draft + the
  checkpoint's transform); inference_ips: batched image-encoder throughput on all cores.
  (Each image costs t_decode core-seconds of decoding plus cores/ips core-seconds of inference.)
- search latency p50/p99 over HTTP (POST /images/search, top_k=10, distinct queries so the
  query cache never hits) at each gallery size: one keep-alive client, then `--clients`
  concurrent clients (searches/s too, and the CPU each search cost in the gallery worker and in
  all server processes: steadier than searches/s on a shared machine), then the same clients
  during an ingest of the image folder into another gallery (p99, errors). The large
  galleries are random unit vectors written through the store before the server starts (the
  store has a single owner); each record names an empty file that exists, since searches
  skip records whose file is gone.
- the server's memory after all of it: RSS and PSS of each of its processes.
- the machine's load average at the start and the end: the client and other users of the
  machine share its cores, so note it beside the figures.

Without --checkpoint a tiny random-init checkpoint is made (fast, tiny model: ingest is then
decode-bound). The default run takes about ten minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
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
    """t_decode on one core, batched inference images/s on all cores, and the bound they imply.

    The encoder is the server's own (`serving.embedder.Embedder`: ONNX Runtime on CPU)."""
    from data.images import load_image
    from serving.embedder import Embedder

    n = cores()
    embedder = Embedder(str(checkpoint), threads=n)
    size = embedder.preprocessing.image_size
    sample = images[: min(len(images), 24)]
    embedder.transform(load_image(sample[0], min_size=size))  # warm-up
    started, cpu = time.perf_counter(), time.thread_time()
    for path in sample:
        embedder.transform(load_image(path, min_size=size))
    t_decode = (time.perf_counter() - started) / len(sample)
    t_decode_cpu = (time.thread_time() - cpu) / len(sample)

    pixels = np.random.default_rng(0).standard_normal((batch_size, 3, size, size)).astype(np.float32)
    embedder.embed_images(pixels)
    reps, started, cpu = 0, time.perf_counter(), time.process_time()
    while reps < 3 or time.perf_counter() - started < 3.0:
        embedder.embed_images(pixels)
        reps += 1
    ips = reps * batch_size / (time.perf_counter() - started)
    infer_cpu = (time.process_time() - cpu) / (reps * batch_size)
    backend, dim = embedder.backend, embedder.dim
    embedder.close()
    del embedder
    gc.collect()
    return {"cores": n, "t_decode_s": t_decode, "inference_ips": ips, "bound_ips": n / (t_decode + n / ips),
            "image_size": size, "t_decode_cpu_s": t_decode_cpu, "infer_cpu_s": infer_cpu, "backend": backend,
            "dim": dim}


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


def fill_store(db: Path, model_id: str, dim: int, sizes: list[int], files: Path) -> dict:
    """Galleries of random unit vectors, written through the store while no server runs.

    Each record names an empty file under `files` that really exists: searches skip records
    whose file is gone from the disk."""
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
                    path = f"{files}/{size}/d{i // 1000:03d}/img_{i:07d}.jpg"
                    if i % 1000 == 0:
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                    open(path, "wb").close()
                    records.append(ImageRecord(image_id(path), path, 1, 1, f"{size}-{i}", 0.0))
                store.upsert(user, records, vectors)
            rates[size] = size / (time.perf_counter() - started)
            users[size] = user.user_id
    return {"users": users, "insert_per_s": rates}


def reuse_store(db: Path, model_id: str, sizes: list[int]) -> dict:
    """The galleries an earlier run filled (same model, same sizes), for --keep-store."""
    from serving.store import GalleryStore

    users = {}
    with GalleryStore(db) as store:
        for size in sizes:
            user = store.find_user(f"bench_{size}")
            if user is None or store.model_id(user) != model_id or store.count(user) != size:
                raise SystemExit(f"--keep-store: {db} has no gallery bench_{size} of {size} vectors of model {model_id}")
            users[size] = user.user_id
    return {"users": users, "insert_per_s": {size: float("nan") for size in sizes}}


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


async def _concurrent(url: str, user_id: str, queries: list[str], clients: int) -> dict:
    # aiohttp rather than httpx here: the client shares the server's cores, and httpx's async
    # client cost ~7 ms of CPU per request against ~1 ms for aiohttp (measured on this machine).
    import aiohttp

    pending = deque(queries)
    latencies: list[float] = []
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as client:
        async def one_client():
            while pending:
                query = pending.popleft()
                started = time.perf_counter()
                try:
                    async with client.post("/images/search", params={"user_id": user_id},
                                           json={"query": query, "top_k": 10}) as response:
                        body = await response.read()
                    ok = response.status == 200 and len(json.loads(body)["results"]) == 10
                    problem = f"{response.status} {body[:100]!r}"
                except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                    ok, problem = False, repr(error)
                if ok:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors.append(problem)

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - started
    return {"latencies": latencies, "errors": errors, "wall_s": wall, "per_s": len(latencies) / wall,
            "ended": time.perf_counter()}


def concurrent_searches(url: str, user_id: str, queries: list[str], clients: int) -> dict:
    """`clients` keep-alive connections sending `queries` between them as fast as answers come."""
    return asyncio.run(_concurrent(url, user_id, queries, clients))


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: a tiny random one)")
    parser.add_argument("--images", type=int, default=200, help="12 MP JPEGs to ingest")
    parser.add_argument("--resolution", default="4000x3000")
    parser.add_argument("--sizes", default="10000,100000", help="gallery sizes for search latency")
    parser.add_argument("--queries", type=int, default=200, help="timed searches per size")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument("--concurrent-queries", type=int, default=600, help="searches per size with --clients clients")
    parser.add_argument("--ingest-queries", type=int, default=200, help="searches sent during an ingest")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workdir", type=Path, help="keep images and store here (default: a temp folder, removed)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--serve-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="a server setting for paired runs, e.g. search.direct_link=false (repeatable)")
    parser.add_argument("--keep-store", action="store_true",
                        help="reuse the filled galleries of an earlier run in --workdir (filling 100k takes minutes)")
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
    reuse = bool(args.keep_store and args.workdir and (db / "users.json").is_file())
    for old in ((db, work / "fill") if not reuse else ()):
        if old.exists():
            shutil.rmtree(old)
    print(f"bench_serving: work folder {work}, {cores()} cores, {load()}", flush=True)
    load_at_start = load()
    run_tag = time.strftime("%Y%m%d%H%M%S")  # fresh ingest galleries, also in a kept store

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
    dim = bound["dim"]  # the head's embed_dim, plus the zero-shot readout's width if the model has one
    started = time.perf_counter()
    if reuse:
        filled = reuse_store(db, model_id, sizes)
    else:
        filled = fill_store(db, model_id, dim, sizes, work / "fill") if sizes else {"users": {}, "insert_per_s": {}}
    fill_s = time.perf_counter() - started

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "serving", f"checkpoint={checkpoint}", f"db_path={db}", f"port={port}",
         "log_level=warning", f"ingest.batch_size={args.batch_size}", *args.serve_arg],
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
        uid = client.post("/db/initialize", json={"user_name": f"bench_ingest_{run_tag}"}).json()["user_id"]
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
                query = f"a photo of a {words[i % len(words)]} number {i} of {size}"  # no cache hits across sizes
                started = time.perf_counter()
                response = client.post("/images/search", params={"user_id": user_id}, json={"query": query, "top_k": 10})
                times.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200 and len(response.json()["results"]) == 10, response.text
            latencies[size] = times

        concurrent = {}
        for size in sizes:
            user_id = filled["users"][size]
            concurrent_searches(url, user_id, [f"warm-up {i}" for i in range(args.clients)], args.clients)
            queries = [f"{words[i % len(words)]} seen from afar, take {i} at {size}" for i in range(args.concurrent_queries)]
            worker_cpu, server_cpu = cpu_seconds(worker), family_cpu_seconds(pids) - sum(os.times()[:2])
            concurrent[size] = concurrent_searches(url, user_id, queries, args.clients)
            done = max(1, len(concurrent[size]["latencies"]))  # CPU per search: less noisy than searches/s
            concurrent[size]["worker_ms"] = (cpu_seconds(worker) - worker_cpu) * 1000 / done
            concurrent[size]["server_ms"] = (family_cpu_seconds(pids) - sum(os.times()[:2]) - server_cpu) * 1000 / done
            print(f"  {args.clients} clients at {size}: {concurrent[size]['per_s']:.0f} searches/s ({load()})", flush=True)

        # Searches while a real ingest runs: a second gallery takes the same folder (all new work).
        during = {}
        if sizes:
            uid2 = client.post("/db/initialize", json={"user_name": f"bench_ingest_under_load_{run_tag}"}).json()["user_id"]
            ingest_done = {}

            def ingest_in_background():
                with httpx.Client(base_url=url, timeout=600) as own:
                    began = time.perf_counter()
                    answer = own.post("/images/add-folder", params={"user_id": uid2}, json={"folder_path": str(image_dir)})
                    ingest_done.update(answer.json(), ended=time.perf_counter(), seconds=time.perf_counter() - began)

            runner = threading.Thread(target=ingest_in_background)
            runner.start()
            time.sleep(1.0)  # the ingest is decoding and embedding by now
            size = sizes[-1]
            queries = [f"{words[i % len(words)]} during the ingest, take {i}" for i in range(args.ingest_queries)]
            during = concurrent_searches(url, filled["users"][size], queries, args.clients)
            runner.join()
            during.update(size=size, ingest=ingest_done, overlapped=during["ended"] <= ingest_done.get("ended", 0))
        memory = process_memory(server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    deadline = time.monotonic() + 5  # multiprocessing's resource tracker exits a moment after the rest
    while time.monotonic() < deadline and any(alive(p) for p in family):
        time.sleep(0.1)
    leftover = [p for p in family if alive(p)]
    print()
    print(f"checkpoint {checkpoint} (model {model_id}, embed dim {dim}, image size {bound['image_size']}, "
          f"encoders: {bound['backend']})")
    if args.serve_arg:
        print(f"server settings: {' '.join(args.serve_arg)}")
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
              f"({len(times)} queries; " + ("store kept from an earlier run)" if reuse else
                                                 f"store filled at {filled['insert_per_s'][size]:.0f} vectors/s)"))
    if sizes:
        print(f"  (filling the store took {fill_s:.0f} s)")
    print()
    print("MEMORY  server processes after the runs above:")
    for row in memory:
        print(f"  pid {row['pid']:>7}  RSS {row['rss_mb']:7.1f} MB  PSS {row['pss_mb']:7.1f} MB  {row['cmd']}")
    print(f"  total   RSS {sum(r['rss_mb'] for r in memory):7.1f} MB  PSS {sum(r['pss_mb'] for r in memory):7.1f} MB")
    print(f"shutdown (SIGINT): exit code {server.returncode}, processes left: {leftover or 'none'}")
    if sizes:
        print()
        print(f"SEARCH  {args.clients} concurrent clients (aiohttp, keep-alive; the client runs on the same cores):")
        for size in sizes:
            c = concurrent[size]
            print(f"  {size:>7} images: {c['per_s']:6.1f} searches/s   p50 {percentile(c['latencies'], 50):6.1f} ms   "
                  f"p99 {percentile(c['latencies'], 99):6.1f} ms   ({len(c['latencies'])} ok, {len(c['errors'])} errors)")
            print(f"  {'':>7}         CPU per search: {c['worker_ms']:.1f} ms in the gallery worker, "
                  f"{c['server_ms']:.1f} ms in all server processes")
        ing = during["ingest"]
        print(f"  during an ingest of {ing.get('added', 0)} images into another gallery ({ing.get('seconds', 0):.1f} s, "
              f"{ing.get('added', 0) / max(ing.get('seconds', 1), 1e-9):.1f} images/s): {len(during['latencies'])} searches "
              f"at {during['size']} images, p50 {percentile(during['latencies'], 50):.1f} ms, "
              f"p99 {percentile(during['latencies'], 99):.1f} ms, {len(during['errors'])} errors"
              f"{'' if during['overlapped'] else ' (the ingest ended before the searches did)'}")
        if during["errors"] or any(concurrent[s]["errors"] for s in sizes):
            print("  first errors:", (during["errors"] + [e for s in sizes for e in concurrent[s]["errors"]])[:3])
    print()
    print(f"SUMMARY (targets of issue 10; {bound['cores']} cores; {load_at_start} at the start, {load()} at the end)")
    rows = [("ingest, % of the bound", 100 * ingest_ips / bound["bound_ips"], ">=", 80.0, "%")]
    big = max(sizes) if sizes else None
    if big:
        rows += [
            (f"sequential search p50 at {big}", percentile(latencies[big], 50), "<=", 15.0, "ms"),
            (f"sequential search p99 at {big}", percentile(latencies[big], 99), "<=", 40.0, "ms"),
        ]
        for size in sizes:
            rows += [(f"{args.clients} clients at {size}: searches/s", concurrent[size]["per_s"], ">=", 150.0, "/s"),
                     (f"{args.clients} clients at {size}: p99", percentile(concurrent[size]["latencies"], 99), "<=", 400.0, "ms")]
        rows += [("p99 during an ingest", percentile(during["latencies"], 99), "<=", 600.0, "ms"),
                 ("errors during an ingest", float(len(during["errors"])), "<=", 0.0, "")]
    rows.append(("server RSS total", sum(r["rss_mb"] for r in memory), "<=", 1000.0, "MB"))
    for name, value, op, target, unit in rows:
        ok = value >= target if op == ">=" else value <= target
        print(f"  {name:<38} {value:9.1f} {unit:<3} target {op} {target:g} {unit:<3} {'met' if ok else 'MISSED'}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

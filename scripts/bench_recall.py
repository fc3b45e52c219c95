"""How exact are the store's top-k answers, and what do they cost, at each HNSW `ef_search`?

    python scripts/bench_recall.py --db-path DB --gallery NAME [--ef 10,20,40,80,160,400]
        [--queries images,texts,random] [--checkpoint CKPT] [--n 300] [--k 10]

For each query set, recall@k of the gallery's HNSW index against an exact search over all of
its vectors (numpy, the same cosine), and the CPU one top-k query costs, at each `ef_search`.
Query sets:
- `images`: stored vectors of records drawn at random, asked for their k nearest others (what
  "find similar" asks); the record itself is left out of both answers.
- `texts`: the text embeddings of the records' file names ("arrow-left.png" -> "arrow left"),
  encoded by `--checkpoint` (what a text search asks; needs the gallery's model).
- `random`: random unit vectors (the worst case for a graph index: no structure to follow).

Chroma keeps the `ef_search` an index was loaded with for the life of the process (modifying
the collection does not change a loaded index), so each value is measured in a fresh child
process that opens the store with it. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(db_path: str, gallery: str, ef: int, queries: Path, k: int) -> None:
    """Ask the store for the top k+1 of every query; print their ids and the cost as JSON."""
    from serving.store import GalleryStore

    vectors = np.load(queries)
    with GalleryStore(db_path, ef_search=ef) as store:
        user = store.find_user(gallery)
        store.query(user, vectors[0], k + 1)  # loads the index
        answers, started, cpu = [], time.perf_counter(), cpu_seconds()
        for vector in vectors:
            answers.append([record.id for record, _ in store.query(user, vector, k + 1)])
        wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    print(json.dumps({"ids": answers, "wall_ms": wall / len(vectors) * 1e3, "cpu_ms": cpu / len(vectors) * 1e3}))


def load_gallery(db_path: str, gallery: str) -> tuple[list[str], list[str], np.ndarray, str]:
    from serving.store import GalleryStore

    ids, paths, chunks = [], [], []
    with GalleryStore(db_path) as store:
        user = store.find_user(gallery)
        if user is None:
            raise SystemExit(f"no gallery named {gallery!r} in {db_path}")
        model_id = store.model_id(user)
        for records, vectors in store.iter_vectors(user, batch=5000):
            ids += [record.id for record in records]
            paths += [record.path for record in records]
            chunks.append(vectors)
    matrix = np.concatenate(chunks)
    return ids, paths, matrix / np.linalg.norm(matrix, axis=1, keepdims=True), model_id


def text_queries(paths: list[str], picked: np.ndarray, checkpoint: str, model_id: str) -> np.ndarray:
    from serving.embedder import Embedder

    embedder = Embedder(checkpoint)
    if embedder.model_id != model_id:
        raise SystemExit(f"--checkpoint is model {embedder.model_id}, the gallery holds {model_id}")
    texts = [re.sub(r"[-_]+", " ", Path(paths[i]).stem).strip() or "picture" for i in picked]
    vectors = np.concatenate([embedder.embed_texts(texts[i:i + 64]) for i in range(0, len(texts), 64)])
    embedder.close()
    return vectors


def exact_top(matrix: np.ndarray, queries: np.ndarray, k: int, leave_out: list[int | None]) -> list[set[int]]:
    scores = queries @ matrix.T
    truth = []
    for row, skip in zip(scores, leave_out):
        if skip is not None:
            row[skip] = -np.inf
        truth.append(set(np.argpartition(-row, k)[:k].tolist()))
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db-path", required=True)
    parser.add_argument("--gallery", required=True)
    parser.add_argument("--ef", default="10,20,40,80,160,400")
    parser.add_argument("--queries", default="images,random", help="images, texts, random (comma-separated)")
    parser.add_argument("--checkpoint", help="the gallery's checkpoint (for --queries texts)")
    parser.add_argument("--n", type=int, default=300, help="queries per set")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--query-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.db_path, args.gallery, args.child, Path(args.query_file), args.k)

    ids, paths, matrix, model_id = load_gallery(args.db_path, args.gallery)
    position = {record_id: i for i, record_id in enumerate(ids)}
    rng = np.random.default_rng(0)
    picked = rng.choice(len(ids), size=min(args.n, len(ids)), replace=False)
    print(f"gallery {args.gallery}: {len(ids)} vectors of {matrix.shape[1]} dims, model {model_id}; "
          f"{len(picked)} queries per set, recall@{args.k} against exact search")
    sets = {}
    for name in args.queries.split(","):
        if name == "images":
            sets[name] = (matrix[picked], list(picked))
        elif name == "texts":
            if not args.checkpoint:
                raise SystemExit("--queries texts needs --checkpoint")
            sets[name] = (text_queries(paths, picked, args.checkpoint, model_id), [None] * len(picked))
        elif name == "random":
            vectors = rng.standard_normal((len(picked), matrix.shape[1])).astype(np.float32)
            sets[name] = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True), [None] * len(picked))
        else:
            raise SystemExit(f"unknown query set {name!r}")

    print(f"{'queries':>8} {'ef_search':>9} {'recall@k':>9} {'CPU ms/query':>13} {'wall ms/query':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (vectors, leave_out) in sets.items():
            truth = exact_top(matrix, vectors, args.k, leave_out)
            query_file = Path(tmp) / f"{name}.npy"
            np.save(query_file, vectors.astype(np.float32))
            for ef in [int(value) for value in args.ef.split(",")]:
                out = subprocess.run(
                    [sys.executable, __file__, "--db-path", args.db_path, "--gallery", args.gallery,
                     "--child", str(ef), "--query-file", str(query_file), "--k", str(args.k)],
                    check=True, capture_output=True, text=True,
                ).stdout
                got = json.loads(out.strip().splitlines()[-1])
                hits = 0
                for answer, expected, skip in zip(got["ids"], truth, leave_out):
                    found = [position[record_id] for record_id in answer if position[record_id] != skip][:args.k]
                    hits += len(expected.intersection(found))
                recall = hits / (args.k * len(truth))
                print(f"{name:>8} {ef:>9} {recall:>9.3f} {got['cpu_ms']:>13.2f} {got['wall_ms']:>14.2f}", flush=True)


if __name__ == "__main__":
    main()

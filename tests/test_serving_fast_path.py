"""The search fast path: query cache, micro-batcher, ONNX encoders, torch-free preprocessing.

Real tiny checkpoints, real ONNX exports (in the user's cache folder, once per model id), real
images; one real `python -m serving` process for concurrent searches over HTTP. Correctness only:
speed and memory are measured by scripts/bench_serving.py (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from serving.batching import GroupBatcher, QueryBatcher
from serving.embedder import Embedder, TorchEncoders
from serving.onnx_encoder import MIN_COSINE, OnnxEncoders
from serving.onnx_export import ensure_export
from serving.preprocess import ImageTransform, QueryTokenizer, ServingPreprocessing
from serving.query_cache import QueryCache
from tests.serving_fixtures import REPO, ServerProcess, image_array, tiny_checkpoint, write_image

TEXTS = ["a dog", "beach at sunset", "a red car parked on a long street in the city at night", "x",
         "Café in PARIS!", "two cats", "a photo of a mountain lake", "birthday cake with candles"]


def cosine(a, b) -> np.ndarray:
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def embedder():
    checkpoint, _ = tiny_checkpoint(0)
    e = Embedder(str(checkpoint), device="cpu", threads=1, encoder="onnx")
    yield e
    e.close()


# ------------------------------------------------------------------ query cache

def test_cache_is_keyed_by_model_id_and_text():
    cache = QueryCache(max_entries=2)
    vector = np.ones(4, dtype=np.float32)
    stored = cache.put("model-a", "dog", vector)
    assert cache.get("model-b", "dog") is None  # another model: never reused
    assert cache.get("model-a", "Dog") is None
    assert cache.get("model-a", "dog") is stored
    assert not stored.flags.writeable  # a caller cannot corrupt later hits
    vector[:] = 5  # nor by changing what it passed in
    assert np.all(cache.get("model-a", "dog") == 1)
    cache.put("model-a", "cat", vector)
    cache.get("model-a", "dog")  # dog is now the most recent
    cache.put("model-a", "bird", vector)  # evicts cat, the least recently used
    assert cache.get("model-a", "cat") is None and cache.get("model-a", "dog") is not None
    assert cache.stats()["entries"] == 2


def test_embedder_query_cache_hits_and_model_ids(embedder):
    first = embedder.embed_query("a dog on the beach")
    misses = embedder.query_cache.misses
    again = embedder.embed_query("a dog on the beach")
    assert again is first and embedder.query_cache.misses == misses
    assert np.allclose(first, embedder.embed_texts(["a dog on the beach"])[0], atol=1e-6)
    other_checkpoint, other_id = tiny_checkpoint(1)
    other = Embedder(str(other_checkpoint), device="cpu", threads=1, encoder="onnx")
    try:
        assert other.model_id == other_id != embedder.model_id
        other.query_cache = embedder.query_cache  # one cache, two models
        theirs = other.embed_query("a dog on the beach")
        assert embedder.query_cache.misses == misses + 1  # a miss: the key holds the model id
        assert cosine(theirs, first)[0] < 0.99
        assert embedder.embed_query("a dog on the beach") is first
    finally:
        other.close()


# ------------------------------------------------------------------ micro-batcher

def test_concurrent_queries_share_a_batch_and_each_gets_its_own_embedding(embedder):
    release = threading.Event()
    calls = []

    def gated(texts):
        calls.append(list(texts))
        if len(calls) == 1:
            release.wait(10)  # the first run holds the encoder while the others queue up
        return embedder.embed_texts(texts)

    batcher = QueryBatcher(gated, max_batch=32)
    try:
        with ThreadPoolExecutor(len(TEXTS)) as pool:
            futures = [pool.submit(batcher.embed, text) for text in TEXTS]
            deadline = time.monotonic() + 10
            # The first run (one query, or a few that arrived together) holds the encoder; wait
            # until every other query is queued behind it.
            while not calls or batcher.queued() < len(TEXTS) - len(calls[0]):
                assert time.monotonic() < deadline, "the queries never queued up"
                threading.Event().wait(0.01)
            release.set()
            vectors = [f.result(10) for f in futures]
    finally:
        release.set()
        batcher.close()
    assert len(calls) == 2 and sorted(calls[0] + calls[1]) == sorted(TEXTS)  # the rest in ONE batch
    assert batcher.largest_batch == max(len(calls[0]), len(calls[1]))
    for text, vector in zip(TEXTS, vectors):
        alone = embedder.embed_texts([text])[0]  # unbatched: no padding
        assert cosine(vector, alone)[0] > 0.99999, text
        assert np.allclose(vector, alone, atol=1e-5), text


def test_batcher_hands_an_error_to_every_caller_and_keeps_going():
    release = threading.Event()
    calls = []

    def flaky(texts):
        calls.append(list(texts))
        if len(calls) == 1:
            release.wait(10)
            return np.zeros((len(texts), 2), dtype=np.float32)
        if len(calls) == 2:
            raise ValueError("encoder broke")
        return np.ones((len(texts), 2), dtype=np.float32)

    batcher = QueryBatcher(flaky)
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(batcher.embed, "first")
            while not calls:
                threading.Event().wait(0.01)
            queued = [pool.submit(batcher.embed, t) for t in ("a", "b", "c")]
            deadline = time.monotonic() + 10
            while batcher.queued() < 3:
                assert time.monotonic() < deadline, "the queries never queued up"
                threading.Event().wait(0.01)
            release.set()
            assert np.all(first.result(10) == 0)
            for future in queued:
                with pytest.raises(ValueError, match="encoder broke"):
                    future.result(10)
        assert np.all(batcher.embed("later") == 1)
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.embed("after close")


# ------------------------------------------------------------------ ONNX encoders and preprocessing

def test_onnx_export_matches_eager_fp32(embedder, tmp_path):
    checkpoint, _ = tiny_checkpoint(0)
    assert embedder.backend == "onnxruntime"
    manifest = json.loads((ensure_export(checkpoint) / "manifest.json").read_text())
    assert min(manifest["min_cosine_image"], manifest["min_cosine_text"]) >= MIN_COSINE
    eager = TorchEncoders(str(checkpoint), device="cpu", bf16=False, threads=1)
    paths = [write_image(tmp_path / f"{i}.jpg", i, size=size) for i, size in
             enumerate([(64, 48), (48, 64), (120, 30), (32, 32)])]
    from data.images import load_image

    images = [load_image(p, min_size=embedder.preprocessing.image_size) for p in paths]
    served = embedder.embed_images([embedder.transform(i) for i in images])
    reference = eager.embed_images([eager.transform(i) for i in images])
    assert cosine(served, reference).min() >= MIN_COSINE
    assert cosine(embedder.embed_texts(TEXTS), eager.embed_texts(TEXTS)).min() >= MIN_COSINE


@pytest.mark.parametrize("resize", ["crop", "squash"])
def test_image_transform_equals_torchvision(resize):
    from data.transforms import Preprocessing, eval_transform

    pre = Preprocessing(image_size=40, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), max_tokens=16, resize=resize)
    ours = ImageTransform(ServingPreprocessing.from_dict(pre.to_dict() | {"resize": resize}))
    theirs = eval_transform(pre)
    for seed, size in enumerate([(64, 48), (48, 64), (40, 40), (201, 33), (17, 90)]):
        image = Image.fromarray(image_array(seed, size))
        expected = theirs(image).numpy()
        got = ours(image)
        assert got.dtype == np.float32 and got.shape == expected.shape == (3, 40, 40)
        assert np.abs(got - expected).max() < 1e-5


def test_tokenizer_equals_transformers():
    from transformers import AutoTokenizer

    from data.transforms import tokenize

    checkpoint, _ = tiny_checkpoint(0)
    hf = AutoTokenizer.from_pretrained(str(checkpoint / "tokenizer"), local_files_only=True)
    ours = QueryTokenizer(checkpoint / "tokenizer", max_tokens=8)
    for batch in (TEXTS, TEXTS[:1], ["only one word"]):
        expected = tokenize(hf, batch, 8)
        got = ours(batch)
        assert np.array_equal(got["input_ids"], expected["input_ids"].numpy())
        assert np.array_equal(got["attention_mask"], expected["attention_mask"].numpy())


def test_onnx_worker_imports_no_torch():
    checkpoint, _ = tiny_checkpoint(0)
    code = ("import sys; from serving.embedder import Embedder; import serving.gallery, serving.ingest; "
            f"e = Embedder({str(checkpoint)!r}, device='cpu', encoder='onnx'); e.embed_query('dog'); "
            "print(sorted(m for m in ('torch', 'torchvision', 'timm', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_onnx_encoders_refuse_another_models_export():
    first, _ = tiny_checkpoint(0)
    second, _ = tiny_checkpoint(1)
    from serving.onnx_encoder import OnnxExportError

    with pytest.raises(OnnxExportError, match="exported from model"):
        OnnxEncoders(ensure_export(first), second)


# ------------------------------------------------------------------ concurrent searches over HTTP

def test_concurrent_searches_over_http_each_get_their_own_results(tmp_path, embedder):
    """40 distinct queries from 20 clients at once (so batched in the worker) rank the images
    exactly as each query's own, unbatched embedding does."""
    from data.images import load_image
    from serving.store import image_id

    checkpoint, _ = tiny_checkpoint(0)
    paths = [write_image(tmp_path / "pics" / f"p{index}.jpg", 300 + index) for index in range(12)]
    size = embedder.preprocessing.image_size
    stored = embedder.embed_images([embedder.transform(load_image(p, min_size=size)) for p in paths])
    ids = [image_id(str(p.resolve())) for p in paths]
    queries = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(40)]
    expected = {}
    for query in queries:
        scores = cosine(stored, np.tile(embedder.embed_texts([query])[0], (len(paths), 1)))
        order = np.argsort(-scores)[:5]
        expected[query] = ([ids[i] for i in order], scores[order])
    server = ServerProcess(checkpoint, tmp_path / "db", tmp_path).wait_ready()
    try:
        with server.client() as client:
            uid = client.post("/db/initialize", json={"user_name": "burst"}).json()["user_id"]
            added = client.post("/images/add-folder", params={"user_id": uid},
                                json={"folder_path": str(tmp_path / "pics")}).json()
            assert added["added"] == 12

        def search(query):
            with server.client() as own:
                response = own.post("/images/search", params={"user_id": uid}, json={"query": query, "top_k": 5})
            assert response.status_code == 200, response.text
            return query, response.json()["results"]

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(search, queries))
        for query, results in answers:
            want_ids, want_scores = expected[query]
            assert [r["id"] for r in results] == want_ids, query
            assert np.allclose([r["score"] for r in results], want_scores, atol=1e-4), query
    finally:
        code, survivors = server.stop()
        assert code == 0 and not survivors


# ------------------------------------------------------------------ the store's kept count

def test_store_count_is_kept_and_follows_every_write(tmp_path, monkeypatch):
    from serving.store import GalleryStore, ImageRecord

    def records(start, stop):
        return [ImageRecord(f"id{i}", f"/pics/{i}.jpg", 1, 1, f"h{i}", 0.0) for i in range(start, stop)]

    vectors = np.eye(8, dtype=np.float32)
    with GalleryStore(tmp_path / "db") as store:
        user, _ = store.get_or_create_user("counted", "model-a")
        assert store.count(user) == 0
        store.upsert(user, records(0, 3), vectors[:3])
        assert store.count(user) == 3
        collection = store.collection(user)
        monkeypatch.setattr(type(collection), "count", lambda self: pytest.fail("count() asked Chroma again"))
        assert store.count(user) == 3  # kept
        monkeypatch.undo()
        store.upsert(user, records(3, 8), vectors[3:8])
        assert store.count(user) == 8
        store.upsert(user, records(0, 2), vectors[:2])  # existing ids: no new records
        assert store.count(user) == 8
        store.delete(user, ["id0", "id5"])
        assert store.count(user) == 6 == collection.count()


# ------------------------------------------------------------------ ingest below searches in CPU priority

def test_image_batches_run_below_search_priority(embedder):
    import os

    def nice_of_this_thread():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = nice_of_this_thread()
    background = embedder._image_thread.submit(nice_of_this_thread).result()
    assert background >= max(mine, 10)
    pixels = np.zeros((2, 3, embedder.preprocessing.image_size, embedder.preprocessing.image_size), np.float32)
    batched = embedder.embed_images(pixels)  # on the background thread
    single = embedder.embed_images(pixels[:1])  # here
    assert np.allclose(batched[0], single[0], atol=1e-5)
    assert nice_of_this_thread() == mine  # the caller's priority is untouched


def test_export_cache_keeps_the_most_recently_used(tmp_path, monkeypatch):
    import os

    from serving import onnx_export

    monkeypatch.setenv("SMART_GALLERY_CACHE", str(tmp_path))
    folders = []
    for index in range(5):
        folder = tmp_path / "onnx" / f"model{index}-v{onnx_export.EXPORT_FORMAT}"
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text("{}")
        os.utime(folder / "manifest.json", (1000 + index, 1000 + index))
        folders.append(folder)
    os.utime(folders[0] / "manifest.json", (5000, 5000))  # the oldest was used last
    removed = onnx_export.prune_exports(keep=3)
    assert sorted(removed) == sorted([folders[1], folders[2]])
    assert [f.exists() for f in folders] == [True, False, False, True, True]


# ------------------------------------------------------------------ batched store queries

def test_concurrent_store_queries_are_batched_and_each_gets_its_own_answer(tmp_path, monkeypatch):
    """Queries waiting together become one Chroma query per (collection, n_results, folder), and
    each caller gets exactly (ids, scores, metadata) what a Chroma query of its own returns."""
    from serving.store import GalleryStore, ImageRecord

    rng = np.random.default_rng(7)
    dim, size = 32, 3000
    vectors = rng.standard_normal((size, dim)).astype(np.float32)
    records = [ImageRecord(f"id{i}", f"/pics/{'a' if i % 3 else 'b'}/{i}.jpg", 1, 1, f"h{i}", float(i))
               for i in range(size)]
    queries = rng.standard_normal((24, dim)).astype(np.float32)
    asks = [(queries[i], (5, 10, 37)[i % 3], (None, "/pics/b")[i % 2]) for i in range(len(queries))]
    with GalleryStore(tmp_path / "db", query_batch=32) as store:  # one batch takes every queued query
        user, _ = store.get_or_create_user("batched", "model-a")
        other, _ = store.get_or_create_user("other", "model-a")
        store.upsert(user, records, vectors)
        store.upsert(other, records[:500], vectors[:500] * -1)
        collection_type = type(store.collection(user))

        def own(owner, vector, n, folder):  # Chroma's answer to this query alone
            got = store.collection(owner).query(
                query_embeddings=vector.reshape(1, -1), n_results=n, include=["metadatas", "distances"],
                where={"ancestors": {"$contains": folder}} if folder else None)
            return [(rid, 1.0 - float(d), meta) for rid, d, meta in
                    zip(got["ids"][0], got["distances"][0], got["metadatas"][0])]

        expected = [own(user if i % 4 else other, v, n, f) for i, (v, n, f) in enumerate(asks)]

        real_query, calls, release = collection_type.query, [], threading.Event()

        def gated(self, *args, **kwargs):  # Chroma's query, held once so the others queue up
            calls.append(len(kwargs["query_embeddings"]))
            if len(calls) == 1:
                release.wait(10)
            return real_query(self, *args, **kwargs)

        monkeypatch.setattr(collection_type, "query", gated)
        with ThreadPoolExecutor(len(asks)) as pool:
            first = pool.submit(store.query, other, *asks[0])
            deadline = time.monotonic() + 10
            while not calls:
                assert time.monotonic() < deadline
                threading.Event().wait(0.01)
            rest = [pool.submit(store.query, user if i % 4 else other, *asks[i]) for i in range(1, len(asks))]
            while store._queries.queued() < len(rest):
                assert time.monotonic() < deadline, "the queries never queued up"
                threading.Event().wait(0.01)
            release.set()
            answers = [first.result(10)] + [future.result(10) for future in rest]
        monkeypatch.undo()
        groups = {((user if i % 4 else other).user_id, n, f) for i, (_, n, f) in enumerate(asks[1:], start=1)}
        assert calls[0] == 1 and len(calls) == 1 + len(groups)  # one Chroma query per group
        assert sum(calls) == len(asks) and store._queries.largest_group > 1
        for i, (answer, want) in enumerate(zip(answers, expected)):
            got = [(record.id, score, record.metadata()) for record, score in answer]
            assert [g[0] for g in got] == [w[0] for w in want], i
            assert [g[1] for g in got] == [w[1] for w in want], i  # bit for bit
            assert [g[2] for g in got] == [w[2] for w in want], i
        # a folder that matches nothing, and an error in one group reaching its callers only
        assert store.query(user, queries[0], 5, folder="/nowhere") == []
        with pytest.raises(Exception):
            store.query(user, np.ones(dim + 1, dtype=np.float32), 5)
        assert [r.id for r, _ in store.query(user, *asks[1])] == [w[0] for w in expected[1]]  # still serving


def test_group_batcher_runs_each_key_once_and_keeps_errors_inside_their_group():
    release, calls = threading.Event(), []

    def run(key, items):
        calls.append((key, list(items)))
        if len(calls) == 1:
            release.wait(10)  # hold the thread while the others queue up
        if key == "bad":
            raise ValueError("bad group")
        return [(key, item * 10) for item in items]

    batcher = GroupBatcher(run)
    try:
        with ThreadPoolExecutor(8) as pool:
            first = pool.submit(batcher.submit, "a", 0)
            while not calls:
                threading.Event().wait(0.01)
            asks = [("a", 1), ("b", 2), ("bad", 3), ("a", 4), ("b", 5), ("bad", 6)]
            futures = [pool.submit(batcher.submit, key, item) for key, item in asks]
            deadline = time.monotonic() + 10
            while batcher.queued() < len(asks):
                assert time.monotonic() < deadline, "the calls never queued up"
                threading.Event().wait(0.01)
            release.set()
            assert first.result(10) == ("a", 0)
            for (key, item), future in zip(asks, futures):
                if key == "bad":
                    with pytest.raises(ValueError, match="bad group"):
                        future.result(10)
                else:
                    assert future.result(10) == (key, item * 10)
        assert calls[1:] == [("a", [1, 4]), ("b", [2, 5]), ("bad", [3, 6])]  # arrival order within a key
        assert batcher.largest_group == 2 and batcher.items == 7 and batcher.calls == 4
        assert batcher.submit("c", 1) == ("c", 10)  # keeps going after an error
    finally:
        release.set()
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit("a", 1)

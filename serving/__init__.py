"""Smart Gallery serving: the LitServe API over an embedded ChromaDB gallery store.

    config.py     settings (from configs/serve.yaml) and the rules that refuse unsafe ones
    schemas.py    pydantic request/response models (what /docs shows)
    paths.py      the allowed-roots policy (resolved paths; `..` and symlinks cannot escape)
    store.py      GalleryStore: one Chroma collection per user, user registry, store lock
    embedder.py   the checkpoint as an embedder (ONNX Runtime or eager PyTorch), query cache + batching
    onnx_encoder.py, onnx_export.py, preprocess.py   the torch-free ONNX Runtime encoders, their export
    query_cache.py, batching.py   the LRU of query embeddings, the query micro-batcher
    priority.py   ingest threads below searches in CPU priority (per-thread nice)
    ingest.py     walk, hash, decode+embed pipeline, dedup rules
    gallery.py    every API operation as a method (model-id checks, re-index)
    thumbnails.py JPEG thumbnails cached on disk under the store folder (ETag = file version)
    jobs.py       background jobs (add-folder): state, progress, cancel
    api.py        GallerySpec + GalleryAPI: all routes feeding one store-owning LitServe worker
    web/          the web page at / (plain HTML, CSS and JavaScript; no build step)
    __main__.py   `python -m serving checkpoint=...`
    reindex.py    `python -m serving.reindex checkpoint=...`
    cli.py        `python -m serving.cli index FOLDER --gallery NAME` / `search "QUERY" --gallery NAME`
"""

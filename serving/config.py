"""Server settings: one typed, picklable object built from the Hydra config `configs/serve.yaml`.

The settings travel to the inference worker process (LitServe spawns it), so they are plain
data. `validate()` holds every rule that must stop the server before it starts.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data.images import MAX_IMAGE_PIXELS

# LitServe 0.2.19 binds only to these (LitServer.run refuses anything else).
LITSERVE_HOSTS = ("127.0.0.1", "0.0.0.0", "::")


class ConfigError(ValueError):
    """A setting that would make the server unsafe or unable to start, with what to do."""


@dataclass
class IngestSettings:
    batch_size: int = 32            # images per embedding batch (and per store upsert)
    decode_workers: int | None = None  # decoding threads; None = CPU cores
    prefetch_batches: int = 2       # batches decoded ahead of the one the model is running
    max_image_pixels: int = MAX_IMAGE_PIXELS


@dataclass
class IndexSettings:
    ef_search: int = 300            # recall vs cost: scripts/bench_recall.py, docs/benchmarks.md
    ef_construction: int = 100
    max_neighbors: int = 16


@dataclass
class SearchSettings:
    # Requests the gallery worker runs at once. Under load the batchers (serving/batching.py)
    # can only batch what is in the worker: with 8 threads, 50 clients' searches queued in
    # front of it and batches stayed small (docs/benchmarks.md). A waiting thread costs no CPU.
    request_threads: int = 48
    max_batch: int = 8              # queries per text-encoder run and per Chroma top-k query
    text_threads: int = 2           # ONNX Runtime threads of the text encoder (serving/onnx_encoder.py)
    direct_link: bool = True        # short reads skip LitServe's queues (serving/worker_link.py)


@dataclass
class ServeSettings:
    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000
    db_path: str = "gallery_db"
    allowed_roots: list[str] = field(default_factory=list)
    api_key: str | None = None      # the admin key
    auth: str | bool = "auto"       # require per-gallery keys: auto = when api_key is set or off loopback
    device: str = "auto"
    bf16: str | bool = "auto"
    torch_threads: int | None = None
    num_api_servers: int = 1
    fast_queue: bool = False        # LitServe's ZeroMQ response transport instead of manager queues
    timeout: float = 60.0           # seconds a request may wait in the worker queue
    graceful_shutdown_s: float = 3.0
    max_body_bytes: int = 65_536
    max_upload_bytes: int = 33_554_432  # uploaded image files (POST /images/upload, search-by-image)
    thumbnail_size: int = 256       # long side of cached thumbnails, pixels
    log_level: str = "info"
    ingest: IngestSettings = field(default_factory=IngestSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    # The store backend (configs/store/, serving/store_backend.py): embedded or a Chroma server.
    store: dict = field(default_factory=lambda: {"_target_": "serving.store_backend.EmbeddedBackend"})

    @classmethod
    def from_mapping(cls, values: dict) -> "ServeSettings":
        values = dict(values)
        values.pop("hydra", None)
        values.pop("reindex", None)  # options of the re-index CLI only
        ingest = IngestSettings(**(values.pop("ingest", None) or {}))
        index = IndexSettings(**(values.pop("index", None) or {}))
        search = SearchSettings(**(values.pop("search", None) or {}))
        groups = {"ingest", "index", "search"}
        known = set(cls.__dataclass_fields__) - groups
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown serve settings: {unknown}; known: {sorted(known | groups)}")
        roots = values.get("allowed_roots") or []
        if isinstance(roots, str):
            roots = [roots]
        values["allowed_roots"] = [str(r) for r in roots]
        return cls(ingest=ingest, index=index, search=search, **values)

    @classmethod
    def from_hydra(cls, cfg) -> "ServeSettings":
        from omegaconf import OmegaConf

        if OmegaConf.is_missing(cfg, "checkpoint"):
            raise ConfigError("no checkpoint given: run `python -m serving checkpoint=PATH/TO/CHECKPOINT_DIR`")
        return cls.from_mapping(OmegaConf.to_container(cfg, resolve=True))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def db_dir(self) -> Path:
        return Path(self.db_path).expanduser().resolve()

    @property
    def cores(self) -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    @property
    def is_loopback(self) -> bool:
        return host_is_loopback(self.host)

    @property
    def auth_enabled(self) -> bool:
        """Whether requests need a key (a gallery's, or the admin key). Always off loopback."""
        value = str(self.auth).lower()
        if value in ("true", "1", "yes", "on"):
            return True
        if value in ("false", "0", "no", "off"):
            return not self.is_loopback
        return bool(self.api_key) or not self.is_loopback

    def validate(self) -> None:
        """Refuse settings that are unsafe or that LitServe cannot run."""
        if self.host == "localhost":
            self.host = "127.0.0.1"
        if self.host not in LITSERVE_HOSTS:
            raise ConfigError(
                f"host={self.host!r}: LitServe can bind only to {', '.join(LITSERVE_HOSTS)} "
                "(127.0.0.1 = this machine only; 0.0.0.0 / :: = every interface)"
            )
        if not self.is_loopback:
            missing = []
            if not self.allowed_roots:
                missing.append("allowed_roots=[/folder/with/pictures,...]")
            if not self.api_key:
                missing.append("an API key (api_key=... or the SMART_GALLERY_API_KEY environment variable)")
            if missing:
                raise ConfigError(
                    f"refusing to bind to {self.host}: a server reachable from other machines must only read "
                    f"under configured folders and must require an API key; set {' and '.join(missing)}, "
                    "or bind to 127.0.0.1"
                )
        if str(self.auth).lower() not in ("auto", "true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ConfigError(f"auth must be auto, true or false, got {self.auth!r}")
        if not self.is_loopback and str(self.auth).lower() in ("false", "0", "no", "off"):
            raise ConfigError("auth=false is allowed on loopback only: a server reachable from other machines "
                              "requires keys")
        if self.api_key is not None and len(str(self.api_key)) < 16:
            raise ConfigError("api_key must be at least 16 characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        if not 1024 <= int(self.port) <= 65535:
            raise ConfigError(f"port must be in 1024..65535, got {self.port}")
        if self.num_api_servers < 1:
            raise ConfigError("num_api_servers must be >= 1")
        if self.ingest.batch_size < 1 or self.ingest.prefetch_batches < 0:
            raise ConfigError("ingest.batch_size must be >= 1 and ingest.prefetch_batches >= 0")
        if min(self.search.request_threads, self.search.max_batch, self.search.text_threads) < 1:
            raise ConfigError("search.request_threads, search.max_batch and search.text_threads must be >= 1")
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes must be at least 1024")
        if self.max_upload_bytes < 1024:
            raise ConfigError("max_upload_bytes must be at least 1024")
        if not 32 <= int(self.thumbnail_size) <= 2048:
            raise ConfigError("thumbnail_size must be in 32..2048")
        for root in self.allowed_roots:
            path = Path(root).expanduser()
            if not path.is_absolute():
                raise ConfigError(f"allowed root {root!r} must be an absolute path")
            if not path.is_dir():
                raise ConfigError(f"allowed root {root!r} is not an existing folder")


def configure_logging(level: str) -> None:
    """The same log format in the server, its gallery worker and the re-index CLI."""
    logging.basicConfig(level=str(level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def host_is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

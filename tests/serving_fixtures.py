"""Helpers for the serving tests: tiny checkpoints, real image files, a real server process."""

from __future__ import annotations

import atexit
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


_CHECKPOINTS: dict[int, tuple[Path, str]] = {}
_SCRATCH = Path(tempfile.mkdtemp(prefix="serving-tests-"))
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)


def tiny_checkpoint(seed: int) -> tuple[Path, str]:
    """(path, model_id) of a tiny checkpoint made once per test process."""
    if seed not in _CHECKPOINTS:
        path = _SCRATCH / f"checkpoint-{seed}"
        _CHECKPOINTS[seed] = (path, make_checkpoint(path, seed))
    return _CHECKPOINTS[seed]


def make_checkpoint(directory: Path, seed: int) -> str:
    """A random-init tiny checkpoint; a different seed gives a different model id."""
    import torch
    from omegaconf import OmegaConf

    from data.transforms import Preprocessing
    from training.checkpoint import save_checkpoint
    from training.model import build_model

    cfg = OmegaConf.load(REPO / "configs/model/tiny.yaml")
    torch.manual_seed(seed)
    model, tok = build_model(cfg)
    model.eval()
    pre = Preprocessing(cfg.image.image_size, tuple(cfg.image.mean), tuple(cfg.image.std), cfg.text.max_tokens)
    return save_checkpoint(directory, model, tok, cfg, pre)


# ------------------------------------------------------------------ images


def image_array(seed: int, size=(64, 48)) -> np.ndarray:
    """A smooth random picture (unique per seed) with some noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-20, 21, (height, width, 3), dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_image(path: Path, seed: int, size=(64, 48), fmt: str | None = None, exif_orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(image_array(seed, size))
    kwargs = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    fmt = fmt or {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF",
                  ".tif": "TIFF", ".tiff": "TIFF"}[path.suffix.lower()]
    image.save(path, format=fmt, **kwargs)
    return path


def write_truncated_jpeg(path: Path, seed: int = 999) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(image_array(seed, (256, 192))).save(buffer, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    return path


def write_bomb_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A tiny file whose header claims width x height pixels (900 MP by default)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """All live descendant pids of `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (zombies that nobody reaps count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class ServerProcess:
    """`python -m serving ...` as a subprocess on a free port."""

    def __init__(self, checkpoint: Path, db_path: Path, cwd: Path, *overrides: str, log: Path | None = None,
                 env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cwd = cwd
        self.log_path = log or (cwd / f"server-{self.port}.log")
        args = [PYTHON, "-m", "serving", f"checkpoint={checkpoint}", f"db_path={db_path}", f"port={self.port}",
                "log_level=warning", *overrides]
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self._log = open(self.log_path, "w")
        # cwd is a scratch folder: it must stay free of client.py and Hydra outputs.
        self.proc = subprocess.Popen(args, cwd=cwd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 90.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> tuple[int, set[int]]:
        """Signal the main process; returns (exit code, descendants still running afterwards)."""
        family = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(p) for p in family):
            time.sleep(0.1)
        survivors = {p for p in family if alive(p)}
        for pid in survivors:  # do not leak processes into other tests
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self._log.close()
        return code, survivors

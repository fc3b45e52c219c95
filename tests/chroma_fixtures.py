"""A real `chroma run` server on a free loopback port, for the tests and the distributed benchmark."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.serving_fixtures import free_port

CHROMA = Path(sys.executable).with_name("chroma")  # the CLI the chromadb package installs beside python


class ChromaServer:
    """`chroma run --path DIR --host 127.0.0.1 --port FREE` as a subprocess."""

    def __init__(self, path: Path, log: Path | None = None):
        self.port = free_port()
        self.host = "127.0.0.1"
        self.path = Path(path)
        self.log_path = log or self.path.with_name(f"chroma-{self.port}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(CHROMA), "run", "--path", str(self.path), "--host", self.host,
                                      "--port", str(self.port)], stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def overrides(self) -> list[str]:
        """What a serving process needs to use this server as its store."""
        return ["store=server", f"store.host={self.host}", f"store.port={self.port}"]

    def wait_ready(self, timeout: float = 60.0) -> "ChromaServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chroma exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"http://{self.host}:{self.port}/api/v2/heartbeat", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"chroma not ready after {timeout} s:\n{self.log_path.read_text()}")

    def client(self):
        import chromadb
        from chromadb.config import Settings

        return chromadb.HttpClient(host=self.host, port=self.port, settings=Settings(anonymized_telemetry=False))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()
        return self.proc.wait()

"""`python -m serving checkpoint=PATH [host=... port=... db_path=... allowed_roots=[...] api_key=...]`

Starts the gallery API (LitServe) on 127.0.0.1:8000 by default. Settings: `configs/serve.yaml`.
Ctrl+C (SIGINT) and SIGTERM both shut it down cleanly: LitServe's own shutdown path stops the
HTTP process(es), the gallery worker and the queue manager. (LitServe handles only
KeyboardInterrupt; a plain SIGTERM left its workers orphaned, so SIGTERM is turned into the
same KeyboardInterrupt here.)
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from serving.config import ConfigError, ServeSettings, configure_logging
from serving.memory import tune_malloc

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
logger = logging.getLogger("serving")


def preflight(settings: ServeSettings) -> None:
    """Fail before any process starts: bad settings, no checkpoint, store in use."""
    settings.validate()
    checkpoint = Path(settings.checkpoint).expanduser()
    if not (checkpoint / "config.json").is_file() or not (checkpoint / "model.safetensors").is_file():
        raise ConfigError(
            f"checkpoint={settings.checkpoint} is not a checkpoint directory (needs config.json and "
            "model.safetensors); train one with `python -m training.train` and pass its best/ or last/ folder"
        )
    settings.checkpoint = str(checkpoint.resolve())
    from serving.store import StoreLockedError, _FolderLock

    settings.db_dir.mkdir(parents=True, exist_ok=True)
    try:
        _FolderLock(settings.db_dir).release()
    except StoreLockedError as error:
        raise ConfigError(str(error)) from None


def _install_signal_handlers() -> None:
    """SIGTERM and SIGINT -> KeyboardInterrupt in this process, which LitServe shuts down cleanly on.

    SIGINT is installed explicitly too: a shell starts background jobs with SIGINT ignored,
    and Python then never raises KeyboardInterrupt.
    """
    main_pid = os.getpid()
    state = {"signalled": False}

    def on_signal(signum, frame):
        if os.getpid() != main_pid:  # a forked child that inherited this handler: default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if state["signalled"]:  # already shutting down: let the shutdown finish
            return
        state["signalled"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _reap_children(timeout: float = 5.0) -> None:
    """Whatever LitServe left running (e.g. a signal during startup): terminate, then kill."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for child in multiprocessing.active_children():
        child.terminate()
    for child in multiprocessing.active_children():
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join(1.0)


def serve(settings: ServeSettings) -> int:
    from serving.api import build_server

    configure_logging(settings.log_level)
    tune_malloc()
    _install_signal_handlers()
    where = f"http://{settings.host}:{settings.port}"
    logger.info("Smart Gallery: web page %s/ (API docs at %s/docs), store %s, checkpoint %s, roots %s, API key %s",
                where, where, settings.db_dir, settings.checkpoint,
                settings.allowed_roots or "any readable path (loopback only)",
                "required (per-gallery keys" + (", admin key set)" if settings.api_key else ")")
                if settings.auth_enabled else "off")
    code = 0
    try:
        server = build_server(settings)
        server.run(host=settings.host, port=settings.port, num_api_servers=settings.num_api_servers,
                   log_level=settings.log_level.lower(), generate_client_file=False, api_server_worker_type="process")
    except KeyboardInterrupt:
        logger.info("interrupted during startup; stopping")
    except RuntimeError as error:  # LitServe: "One or more workers failed to start"
        print(f"smart-gallery: {error} (the worker's error is printed above)", file=sys.stderr)
        code = 1
    finally:
        _reap_children()
    return code


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    try:
        settings = ServeSettings.from_hydra(cfg)
        preflight(settings)
    except ConfigError as error:
        print(f"smart-gallery: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(serve(settings))


if __name__ == "__main__":
    main()

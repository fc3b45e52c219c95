"""What the evaluation CLIs (evaluate, compare) share: reading the split, loading checkpoints, errors.

Expected failures (no checkpoint there, data missing, empty split, a required option not
given) end the process with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from data.errors import DataUnavailableError
from data.records import Sample, select_split
from evaluation.retrieval import EvaluationError
from training.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint

log = logging.getLogger("evaluation")

EXIT_USAGE = 2
_PRECISION = {"auto": "auto", "fp32": False, "bf16": True}


class CliError(Exception):
    """An expected failure with a message meant for the person running the command."""


def fail(message: str) -> None:
    """Log the message (into the run's log file), print it to stderr, exit with code 2."""
    message = " ".join(str(message).split())  # one line
    log.error("%s", message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


@contextlib.contextmanager
def expected_errors():
    """Turn the errors a user can fix into `fail(...)`; anything else stays a traceback (a bug)."""
    try:
        yield
    except MissingMandatoryValue as error:
        key = getattr(error, "full_key", None) or "a required option"
        fail(f"missing value for {key}: pass it on the command line, e.g. {key}=...")
    except (CheckpointError, DataUnavailableError, EvaluationError, CliError) as error:
        fail(str(error))


def as_list(value) -> list[str]:
    """A command-line value given as one item or a list (`checkpoints=[a,b]`, `only=x`) as strings."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, ListConfig)):
        return [str(v) for v in value]
    return [str(value)]


def configure_torch(cfg: DictConfig) -> None:
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))


def load_split(cfg: DictConfig) -> tuple[list[Sample], str]:
    """The samples of `cfg.split` of the dataset `cfg.data` (reader instantiated by Hydra)."""
    name = str(cfg.data.get("name", "data"))
    missing = [key for key in cfg.data if OmegaConf.is_missing(cfg.data, key)]
    if missing:
        raise CliError(f"{name} needs " + ", ".join(f"data.{key}=..." for key in missing)
                       + f" (see configs/data/{name}.yaml)")
    try:
        samples = instantiate(cfg.data.reader)
    except InstantiationException as error:
        cause = error.__cause__ or error
        if isinstance(cause, (DataUnavailableError, MissingMandatoryValue)):
            raise cause from None
        if isinstance(cause, (ValueError, OSError)):  # unreadable file, bad header...
            raise CliError(f"cannot read dataset {name}: {cause}") from None
        raise
    try:
        selected = select_split(samples, str(cfg.split), tuple(cfg.data.split_fractions))
    except ValueError as error:
        raise CliError(str(error)) from None
    if cfg.data.get("max_samples"):
        selected = selected[: int(cfg.data.max_samples)]
    if not selected:
        raise CliError(f"split {cfg.split!r} of {name} is empty ({len(samples)} samples in the dataset, "
                       f"split_fractions {list(cfg.data.split_fractions)}); try split=all or other fractions")
    log.info("dataset %s, split %s: %d images", name, cfg.split, len(selected))
    return selected, name


def load(cfg: DictConfig, path: str) -> LoadedCheckpoint:
    precision = str(cfg.get("precision", "auto"))
    if precision not in _PRECISION:
        raise CliError(f"precision must be one of {sorted(_PRECISION)}, got {precision!r}")
    checkpoint = load_checkpoint(path, device=str(cfg.device), bf16=_PRECISION[precision])
    log.info("checkpoint %s (model id %s) on %s%s", checkpoint.path, checkpoint.model_id, checkpoint.device,
             ", bf16 autocast" if checkpoint.use_bf16 else "")
    return checkpoint


def data_config(cfg: DictConfig) -> dict:
    """The resolved data section, recorded in metrics.json (which CSV, which split fractions...)."""
    return OmegaConf.to_container(cfg.data, resolve=True)


def evaluation_kwargs(cfg: DictConfig) -> dict:
    """The keyword arguments of evaluate_checkpoint that come from the config."""
    ks = [int(k) for k in cfg.ks]
    if not ks or min(ks) < 1:
        raise CliError(f"ks must be positive integers, got {list(cfg.ks)}")
    max_queries = cfg.get("max_queries")
    return dict(ks=tuple(ks), batch_size=int(cfg.batch_size), text_batch_size=int(cfg.text_batch_size),
                num_workers=int(cfg.num_workers), max_queries=int(max_queries) if max_queries else None,
                seed=int(cfg.seed), progress=bool(cfg.progress))

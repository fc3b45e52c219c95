"""The suite's domains (configs/suite.yaml `domains:`), each read once, and which of them a checkpoint trained on.

A domain is a configs/data/ config (`data: <name>`) or an inline reader (`reader: {_target_: ...}`,
optional `split_fractions`), with `overrides` merged into it and its own `split` (null: the
suite's). A domain whose data is missing is kept as "not available: <reason>" (a column of
n/a in suite.md), not an error: every reason a user fixes by installing or pointing at data.

A checkpoint trained on a domain when its config.json names it: "datasets" (written by
training.loop), else inferred from "data" (the reader's _target_).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hydra.errors import InstantiationException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from data.errors import DataUnavailableError
from data.records import Sample
from evaluation.cli import CliError, as_list, load_split
from evaluation.retrieval import EvaluationError

log = logging.getLogger("evaluation")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_FRACTIONS = [0.8, 0.1, 0.1]


@dataclass
class Domain:
    """One column of the table: a split of one dataset, or why it is not available."""

    name: str
    split: str
    source: str                        # the data config group name, or "inline"
    dataset: str | None = None         # the data config's `name`
    samples: list[Sample] | None = None
    reason: str | None = None          # why it is not available
    data_config: dict = field(default_factory=dict)
    pool: dict = field(default_factory=dict)   # num_queries / num_candidates of the first evaluation

    @property
    def available(self) -> bool:
        return self.samples is not None

    @property
    def aliases(self) -> set[str]:
        """Training dataset names that count as this domain: its key and its data config's name."""
        return {self.name} | ({self.dataset} if self.dataset else set())

    def mark_unavailable(self, reason: str) -> None:
        """From now on a column of n/a for every checkpoint; the reason on one line (a table cell)."""
        self.reason, self.samples = " ".join(str(reason).split()), None
        log.warning("domain %s not available: %s", self.name, self.reason)

    def to_dict(self) -> dict:
        entry = {"status": "ok" if self.available else "not available", "split": self.split,
                 "data": self.source, "dataset": self.dataset}
        if self.available:
            entry.update(num_images=len(self.samples), **self.pool)
        else:
            entry["reason"] = self.reason
        entry["data_config"] = self.data_config
        return entry


def selected_domains(cfg: DictConfig) -> dict[str, DictConfig]:
    """The configured domains, restricted to `only` (in its order) when given."""
    domains = cfg.get("domains") or {}
    if not isinstance(domains, Mapping):
        raise CliError("domains must be a mapping name -> {data: ..., split: ..., overrides: {...}}; "
                       "to pick some of the configured ones use only=[a,b]")
    only = cfg.get("only")
    if only is None:
        chosen = list(domains)
    else:
        chosen = list(dict.fromkeys(as_list(only)))
        unknown = [name for name in chosen if name not in domains]
        if unknown:
            raise CliError(f"unknown domain(s) {unknown} in only=...; configured: {sorted(domains)} "
                           "(add one with '+domains.NAME={data:...}')")
    if not chosen:
        raise CliError("no domains to evaluate: configure domains in configs/suite.yaml or drop only=[]")
    return {name: domains[name] for name in chosen}


def compose_data_config(name: str) -> DictConfig:
    """configs/data/<name>.yaml composed by Hydra (so a data config may have its own defaults list)."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-/]+", name):
        raise CliError(f"bad data config name {name!r}")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside hydra.main (or a test's initialize)
        composed = compose(overrides=[f"+data={name}"])
    else:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            composed = compose(overrides=[f"+data={name}"])
    return OmegaConf.create(OmegaConf.to_container(composed.data, resolve=False))


def domain_data_config(name: str, spec: DictConfig) -> tuple[DictConfig, str]:
    """The data section of a domain (a configs/data/ config or an inline reader, then `overrides`)."""
    if spec.get("reader") is not None:
        data = OmegaConf.create({"name": name, "reader": OmegaConf.to_container(spec.reader, resolve=False),
                                 "split_fractions": list(spec.get("split_fractions") or DEFAULT_FRACTIONS),
                                 "max_samples": None})
        source = "inline"
    elif spec.get("data"):
        source = str(spec.data)
        data = compose_data_config(source)
    else:
        raise CliError(f"domain {name} needs data: <a config of configs/data/> or reader: {{_target_: ...}}")
    overrides = spec.get("overrides") or {}
    if overrides:
        data = OmegaConf.merge(data, OmegaConf.create(OmegaConf.to_container(overrides, resolve=False)))
    return data, source


def read_domain(name: str, spec: DictConfig, default_split: str) -> Domain:
    """The domain's split, read once; any failure a user fixes by installing or pointing at data
    becomes `reason` (reported as not available) instead of an error."""
    split = str(spec.get("split") or default_split)
    domain = Domain(name=name, split=split, source=str(spec.get("data") or "inline"))
    reason = None
    try:
        data, domain.source = domain_data_config(name, spec)
        domain.dataset = str(data.get("name", name))
        missing = [key for key in data if OmegaConf.is_missing(data, key)]
        if missing:  # named as the suite's overrides, not as evaluate's data.KEY=...
            raise CliError("needs " + ", ".join(f"domains.{name}.overrides.{key}=..." for key in missing))
        root = OmegaConf.create({"data": data, "split": split})
        domain.data_config = OmegaConf.to_container(root.data, resolve=True)
        domain.samples, _ = load_split(root)
    except MissingConfigException:
        reason = f"no data config configs/data/{spec.get('data')}.yaml"
    except InstantiationException as error:
        reason = f"cannot instantiate its reader: {error}"
    except (DataUnavailableError, CliError, EvaluationError, ImportError, OSError, ValueError) as error:
        reason = str(error)
    except Exception as error:  # noqa: BLE001 - OmegaConf resolution errors and the like
        if not type(error).__module__.startswith(("omegaconf", "hydra")):
            raise
        reason = f"bad domain config: {error}"
    if reason is not None:
        domain.mark_unavailable(reason)
    return domain


# --- which domains a checkpoint trained on ------------------------------------------------------------

def reader_dataset_names() -> dict[str, str]:
    """reader _target_ -> data config name, from configs/data/*.yaml (targets used by one config only)."""
    names: dict[str, set[str]] = {}
    for path in sorted((CONFIG_DIR / "data").glob("*.yaml")):
        try:
            data = OmegaConf.load(path)
            target = data.get("reader", {}).get("_target_")
        except Exception:  # noqa: BLE001 - a half-written config of someone else's must not stop the suite
            continue
        if target:
            names.setdefault(str(target), set()).add(str(data.get("name", path.stem)))
    return {target: next(iter(found)) for target, found in names.items() if len(found) == 1}


def trained_datasets(config: dict) -> tuple[list[str] | None, str]:
    """(dataset names, where they came from): "datasets", "data" (inferred from the reader) or
    "unknown" (None). A zero-shot checkpoint records `"datasets": []`: trained on nothing."""
    datasets = config.get("datasets")
    if isinstance(datasets, list) and datasets:
        return [str(d) for d in datasets], "datasets"
    target = config.get("data")
    if target and str(target) != "None":
        target = str(target)
        name = reader_dataset_names().get(target)
        if name is None:
            function = target.rsplit(".", 1)[-1]
            name = function[len("read_"):] if function.startswith("read_") and len(function) > 5 else None
        if name:
            return [name], "data"
    if isinstance(datasets, list):
        return [], "datasets"
    return None, "unknown"

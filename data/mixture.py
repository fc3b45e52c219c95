"""Training on several datasets at once (`data=mixture`): one reader over many, and a weighted sampler.

`read_mixture` reads each dataset with its own reader section (exactly the `reader:` of that
dataset's single config), tags every Sample with the dataset's name (`Sample.source`) and
concatenates them. Samples are kept exactly as each reader made them (image id, split key),
so `select_split` (a hash of the sample's own split key or id) puts every sample in the same
split as when its dataset is trained alone; two datasets that yield the same image id are an
error.

Epoch composition (`mixture_epoch_indices`): with weights w_d normalised to sum 1 over the
sources present and N the number of training samples, an epoch has N samples, of which
n_d = round(w_d * N) come from dataset d. The n_d are rounded by largest remainder so that
they sum to exactly N (each n_d is floor(w_d * N) or ceil(w_d * N); ties go to the earlier
source in order of first appearance). Within a dataset the draw is without replacement
while it lasts: its indices in a random order, then, when n_d exceeds its size, another
fresh random order of all of them, and so on, cut at n_d. The N picks are then shuffled
together. Everything comes from the one `torch.Generator` passed in, so the epoch is
deterministic given (seed, epoch) via `training.batches.epoch_generator`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping, Sequence

import torch

from data.errors import DataUnavailableError
from data.records import Sample

log = logging.getLogger(__name__)


def read_mixture(datasets: Mapping) -> list[Sample]:
    """Concatenate the samples of every dataset in `datasets` ({name: {weight, reader}}).

    Each `reader` section is instantiated with `hydra.utils.instantiate` (so the config must
    give this function `_recursive_: false`). Every Sample gets `source=name`.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if not datasets:
        raise ValueError("data=mixture needs at least one entry under data.datasets")
    samples: list[Sample] = []
    owner: dict[str, str] = {}
    counts: dict[str, int] = {}
    for name, entry in datasets.items():
        name = str(name)
        if entry is None or "reader" not in entry:
            raise ValueError(f"data.datasets.{name} needs a `reader:` section (and a `weight:`)")
        try:
            read = instantiate(entry["reader"])
        except InstantiationException as error:
            cause = error.__cause__ or error.__context__
            if isinstance(cause, DataUnavailableError):
                raise DataUnavailableError(f"dataset {name!r} of the mixture: {cause}") from cause
            raise
        for sample in read:
            if sample.image_id in owner:
                other = owner[sample.image_id]
                where = f"datasets {other!r} and {name!r}" if other != name else f"dataset {name!r} (twice)"
                raise ValueError(
                    f"image id {sample.image_id!r} occurs in {where}: ids must be unique across a mixture "
                    f"(the split is a hash of the id). Caption CSVs use the image name as written, so two CSVs "
                    f"listing `images/x.jpg` collide: write distinct (e.g. absolute) image paths in one of them")
            owner[sample.image_id] = name
            samples.append(dataclasses.replace(sample, source=name))
        counts[name] = len(read)
    log.info("mixture of %d datasets, %d samples: %s", len(counts), len(samples),
             ", ".join(f"{n}={c}" for n, c in counts.items()))
    return samples


def dataset_weights(data_cfg) -> dict[str, float] | None:
    """Per-dataset weights of a data config: `data.weights`, else each `data.datasets.<name>.weight`
    (default 1.0); None for a single dataset config."""
    weights = data_cfg.get("weights")
    if weights:
        return {str(k): float(v) for k, v in weights.items()}
    datasets = data_cfg.get("datasets")
    if not datasets:
        return None
    return {str(name): float((entry or {}).get("weight", 1.0)) for name, entry in datasets.items()}


def source_counts(samples: Sequence[Sample]) -> dict[str, int]:
    """Number of samples per source (None for untagged samples), in order of first appearance."""
    return dict(Counter(s.source for s in samples))


def mixture_sources(samples: Sequence[Sample], weights: Mapping[str, float] | None) -> list[str] | None:
    """The per-sample source names when weighted mixture sampling applies (samples from more than
    one source and weights given), else None: the single-dataset path keeps its plain shuffle."""
    if not weights:
        return None
    sources = [s.source for s in samples]
    present = set(sources)
    if len(present) < 2:
        return None
    missing = sorted(str(s) for s in present if s not in weights)
    if missing:
        raise ValueError(f"no sampling weight for source(s) {missing}; weights given for {sorted(weights)}")
    return sources


def mixture_counts(sizes: Mapping[str, int], weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Samples per source in an epoch of `total`: round(w_d * total) by largest remainder (sums to total).

    Only the sources in `sizes` count; their weights are normalised to sum 1."""
    w = {name: float(weights[name]) for name in sizes}
    if any(v < 0 for v in w.values()) or not sum(w.values()) > 0:
        raise ValueError(f"mixture weights must be >= 0 with a positive sum; got {w}")
    scale = sum(w.values())
    exact = {name: v / scale * total for name, v in w.items()}
    counts = {name: int(x) for name, x in exact.items()}
    order = sorted(exact, key=lambda name: -(exact[name] - counts[name]))  # stable: ties keep source order
    for name in order[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def mixture_epoch_indices(sources: Sequence[str], weights: Mapping[str, float],
                          generator: torch.Generator) -> torch.Tensor:
    """One epoch's sample indices (length len(sources)) drawn per source in proportion to `weights`.

    See the module docstring for the exact definition."""
    positions: dict[str, list[int]] = {}
    for index, source in enumerate(sources):
        positions.setdefault(source, []).append(index)
    counts = mixture_counts({name: len(p) for name, p in positions.items()}, weights, len(sources))
    picks = []
    for name, members in positions.items():
        members_t = torch.tensor(members, dtype=torch.long)
        need = counts[name]
        while need > 0:
            take = members_t[torch.randperm(len(members_t), generator=generator)][:need]
            picks.append(take)
            need -= len(take)
    chosen = torch.cat(picks) if picks else torch.empty(0, dtype=torch.long)
    return chosen[torch.randperm(len(chosen), generator=generator)]

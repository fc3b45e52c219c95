"""data=mixture: several datasets read together, each keeping its split, drawn by weight per epoch."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import compose_train
from data.mixture import (dataset_weights, mixture_counts, mixture_epoch_indices, mixture_sources, read_mixture,
                          source_counts)
from data.readers import read_caption_csv
from data.records import SPLITS, Sample, select_split, split_of
from training.batches import epoch_generator

COLOURS = [(220, 30, 30), (30, 170, 60), (30, 60, 220), (235, 210, 20)]


def make_csv_dataset(root: Path, name: str, count: int | None = None, *, train: int | None = None,
                     val: int = 0, fractions=(0.8, 0.1, 0.1), folder: str | None = None) -> Path:
    """Tiny PNGs under root/<folder or name>/ and root/<name>.csv listing them as `<folder>/<file>`
    (so the image ids, the names as written, differ between datasets). With `train=` the images are
    chosen by their hash split so the dataset has exactly `train` train and `val` val samples."""
    folder = folder or name
    (root / folder).mkdir(parents=True, exist_ok=True)
    names, n_train, n_val, number = [], 0, 0, 0
    while (count is not None and len(names) < count) or (count is None and (n_train < train or n_val < val)):
        image = f"{folder}/{number:04d}.png"
        number += 1
        if count is None:
            split = split_of(image, tuple(fractions))
            if split == "train" and n_train < train:
                n_train += 1
            elif split == "val" and n_val < val:
                n_val += 1
            else:
                continue
        names.append(image)
    csv_path = root / f"{name}.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for i, image in enumerate(names):
            Image.new("RGB", (36, 36), COLOURS[i % len(COLOURS)]).save(root / image)
            writer.writerow([image, f"{name} picture {i % 5}"])
    return csv_path


def csv_entry(csv_path: Path, weight: float) -> dict:
    return {"weight": weight, "reader": {"_target_": "data.readers.read_caption_csv", "csv_path": str(csv_path)}}


@pytest.fixture()
def three(tmp_path):
    return {name: make_csv_dataset(tmp_path, name, count) for name, count in (("a", 40), ("b", 25), ("c", 12))}


def test_concatenates_in_order_and_tags_each_sample_with_its_dataset(three):
    mixed = read_mixture({name: csv_entry(path, 1.0) for name, path in three.items()})
    alone = {name: read_caption_csv(str(path)) for name, path in three.items()}
    assert [s.image_id for s in mixed] == [s.image_id for name in three for s in alone[name]]
    assert source_counts(mixed) == {"a": 40, "b": 25, "c": 12}
    for sample in mixed:
        assert sample.image_id.startswith(sample.source + "/")
    assert all(s.source is None for s in alone["a"])  # a plain reader leaves the field at its default
    assert Sample("x", "/x.png", ("c",)).source is None


@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.1), (0.5, 0.3, 0.2)])
def test_each_dataset_keeps_the_split_it_has_alone(three, fractions):
    mixed = read_mixture({name: csv_entry(path, 1.0) for name, path in three.items()})
    for name, path in three.items():
        alone = read_caption_csv(str(path))
        for split in SPLITS:
            expected = [s.image_id for s in select_split(alone, split, fractions)]
            got = [s.image_id for s in select_split(mixed, split, fractions) if s.source == name]
            assert got == expected, (name, split)


def test_the_same_image_id_in_two_datasets_is_a_clear_error(tmp_path):
    first = make_csv_dataset(tmp_path / "x", "first", 5, folder="img")
    second = make_csv_dataset(tmp_path / "y", "second", 5, folder="img")  # same names, other folder
    with pytest.raises(ValueError, match=r"'img/0000.png'.*'one' and 'two'.*unique"):
        read_mixture({"one": csv_entry(first, 1.0), "two": csv_entry(second, 1.0)})


def test_counts_follow_the_weights_within_one_and_sum_to_n():
    sources = ["a"] * 37 + ["b"] * 20
    order = mixture_epoch_indices(sources, {"a": 3.0, "b": 1.0}, epoch_generator(0, 0))
    assert len(order) == 57
    counts = Counter(sources[i] for i in order.tolist())
    assert abs(counts["a"] - 0.75 * 57) <= 1 and abs(counts["b"] - 0.25 * 57) <= 1
    assert counts == {"a": 43, "b": 14}  # round(42.75), round(14.25)
    picked = Counter(order.tolist())
    assert all(picked[i] == 1 for i in range(37, 57) if i in picked)  # b: without replacement (14 of 20)
    assert set(range(37)) <= set(picked) and max(picked[i] for i in range(37)) == 2  # a: all once, 6 again
    for total in range(1, 60):  # largest remainder: always sums to N, each within 1 of w*N
        counts = mixture_counts({"a": 5, "b": 5, "c": 5}, {"a": 1.0, "b": 1.0, "c": 1.0}, total)
        assert sum(counts.values()) == total and all(abs(c - total / 3) < 1 for c in counts.values())


def test_a_small_dataset_with_a_big_weight_repeats_in_fresh_orders():
    sources = ["big"] * 40 + ["small"] * 5
    order = mixture_epoch_indices(sources, {"big": 1.0, "small": 1.0}, epoch_generator(1, 0)).tolist()
    small = [i for i in order if sources[i] == "small"]
    assert len(small) in (22, 23)
    assert sorted(Counter(small).values()) in ([4, 4, 4, 5, 5], [4, 4, 5, 5, 5])  # every one 4-5 times
    big = [i for i in order if sources[i] == "big"]
    assert len(set(big)) == len(big)


def test_the_draw_is_deterministic_per_seed_and_epoch():
    sources = ["a"] * 30 + ["b"] * 10 + ["c"] * 3
    weights = {"a": 0.2, "b": 0.5, "c": 0.3}
    first = mixture_epoch_indices(sources, weights, epoch_generator(7, 2))
    assert torch.equal(first, mixture_epoch_indices(sources, weights, epoch_generator(7, 2)))
    assert not torch.equal(first, mixture_epoch_indices(sources, weights, epoch_generator(7, 3)))
    assert not torch.equal(first, mixture_epoch_indices(sources, weights, epoch_generator(8, 2)))


def test_mixture_sampling_applies_only_to_several_weighted_sources():
    one = [Sample(f"{i}", "/x", ("c",), source="a") for i in range(4)]
    two = one + [Sample("z", "/x", ("c",), source="b")]
    assert mixture_sources(one, {"a": 1.0}) is None  # one source: the plain shuffle, as for a single dataset
    assert mixture_sources(two, None) is None
    assert mixture_sources(two, {"a": 1.0, "b": 2.0}) == ["a"] * 4 + ["b"]
    with pytest.raises(ValueError, match="no sampling weight"):
        mixture_sources(two, {"a": 1.0})
    with pytest.raises(ValueError, match="weights"):
        mixture_counts({"a": 2, "b": 2}, {"a": 0.0, "b": 0.0}, 4)


def mixture_overrides(*entries: tuple[str, Path, float]) -> list[str]:
    out = ["data=mixture", "~data.datasets.openclipart"]
    for name, path, weight in entries:
        out.append(f"+data.datasets.{name}={{weight:{weight},reader:{{_target_:data.readers.read_caption_csv,"
                   f"csv_path:'{path}'}}}}")
    return out


def test_data_mixture_composes_with_openclipart_by_default_and_datasets_from_the_command_line(three):
    cfg = compose_train(["data=mixture"])
    assert cfg.data.name == "mixture" and list(cfg.data.datasets) == ["openclipart"]
    assert cfg.data.datasets.openclipart.reader == compose_train(["data=openclipart"]).data.reader
    assert dataset_weights(cfg.data) == {"openclipart": 1.0}
    cfg = compose_train(mixture_overrides(("a", three["a"], 3), ("b", three["b"], 1)))
    OmegaConf.resolve(cfg)
    assert dataset_weights(cfg.data) == {"a": 3.0, "b": 1.0}
    from hydra.utils import instantiate

    assert source_counts(instantiate(cfg.data.reader)) == {"a": 40, "b": 25}
    assert dataset_weights(OmegaConf.create({"weights": {"a": 1}, "datasets": {"a": {"weight": 5}}})) == {"a": 1.0}
    assert dataset_weights(compose_train(["data=openclipart"]).data) is None


def test_one_tiny_epoch_on_a_mixture_draws_each_source_by_its_weight(tmp_path, caplog):
    from data.dataset import FailureLog
    from training.batches import CachedBatches
    from training.loop import Trainer

    fractions = (0.7, 0.3, 0.0)  # experiment=tiny's split
    big = make_csv_dataset(tmp_path, "big", train=18, val=3, fractions=fractions)
    small = make_csv_dataset(tmp_path, "small", train=6, val=2, fractions=fractions)
    cfg = compose_train(["experiment=tiny", *mixture_overrides(("big", big, 1.0), ("small", small, 1.0)),
                         "trainer.max_epochs=1"])
    with caplog.at_level(logging.INFO, logger="training.loop"):
        trainer = Trainer(cfg, tmp_path / "run")
    assert source_counts(trainer.batches.samples) == {"big": 18, "small": 6}
    assert len(trainer.validator.images) == 5  # the concatenated val splits
    assert "per source: train {'big': 18, 'small': 6}, val {'big': 3, 'small': 2}" in caplog.text
    assert len(trainer.batches) == 24 // 8
    seen: list[str] = []
    loss = trainer.training_loss
    trainer.training_loss = lambda batch: (seen.extend(batch.sources), loss(batch))[1]
    trainer.fit()  # streaming batches (experiment=tiny)
    assert trainer.step == 3
    assert Counter(seen) == {"big": 12, "small": 12}  # weights 1:1 over N=24; the 6 small ones twice each

    cached = CachedBatches(trainer.model, trainer.tokenizer, trainer.batches.samples, trainer.preprocessing,
                           trainer.device, False, 8, True, 0, FailureLog(), views=2, weights={"big": 3, "small": 1})
    epoch = list(cached.epoch(42, 0))
    assert len(epoch) == 3 and Counter(s for b in epoch for s in b.sources) == {"big": 18, "small": 6}
    assert [b.captions for b in epoch] == [b.captions for b in cached.epoch(42, 0)]


def test_single_dataset_epoch_order_is_unchanged(shapes_csv, tmp_path):
    """Without a mixture the cached batches are exactly the original per-sample draw."""
    from training.loop import Trainer

    cfg = compose_train(["experiment=tiny", f"data.csv={shapes_csv}", "trainer.cache_features=true",
                         "trainer.cache_views=2", "trainer.max_steps=1"])
    batches = Trainer(cfg, tmp_path).batches
    assert batches.sources is None
    generator = epoch_generator(42, 1)
    n = len(batches.samples)
    order = torch.randperm(n, generator=generator)
    picks = torch.rand(n, generator=generator)
    view_of = torch.randint(batches.views, (n,), generator=generator)
    for b, batch in enumerate(batches.epoch(42, 1)):
        rows = order[b * batches.batch_size: (b + 1) * batches.batch_size]
        text_rows = [batches.caption_rows[i][int(picks[i] * len(batches.caption_rows[i]))] for i in rows.tolist()]
        assert batch.captions == [batches.texts[i] for i in text_rows]
        assert torch.equal(batch.image_prefix, batches.images[rows, view_of[rows]].float())

"""Data-parallel training: torchrun with 2 gloo processes trains exactly like one process.

The runs are the real command lines (`python -m training.train` and `torchrun ... -m
training.train`) on the tiny recipe with cached prefixes and no dropout, so a step is
deterministic: the same global batch of 8 must give the same loss and the same weights (fp32
tolerance) whether one process takes all 8 pairs or two processes take 4 each.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.distributed import Shard
from training.loss import contrastive_loss

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _train(csv_path, run_dir: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m"] if processes == 1 else [
        str(TORCHRUN), "--standalone", f"--nproc_per_node={processes}", "-m"]
    command = [*launcher, "training.train", "experiment=tiny", f"data.csv={csv_path}", "trainer.batch_size=8",
               "trainer.cache_features=true", "+model.text.dropout=0.0", "trainer.device=cpu",
               f"hydra.run.dir={run_dir}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _loss(run_dir: Path) -> float:
    return float(list(csv.DictReader(open(run_dir / "metrics.csv")))[-1]["train_loss"])


def _assert_same_weights(a: Path, b: Path) -> None:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert left.keys() == right.keys()
    for name in left:  # includes the batch-norm running statistics of the trained stages
        torch.testing.assert_close(left[name].float(), right[name].float(), atol=2e-5, rtol=1e-5, msg=name)


@pytest.fixture(scope="module")
def runs(shapes_csv, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    _train(shapes_csv, root / "one", "trainer.max_steps=1")
    two = _train(shapes_csv, root / "two", "trainer.max_steps=1", processes=2)
    return root, two


def test_one_ddp_step_matches_one_process_on_the_same_global_batch(runs):
    root, two = runs
    assert _loss(root / "two") == pytest.approx(_loss(root / "one"), rel=1e-6)
    _assert_same_weights(root / "one" / "last", root / "two" / "last")
    log = (root / "two" / "train.log").read_text()
    assert "world size 2 (backend gloo" in log and "global batch 8, 4 per process" in log
    assert len(list(csv.DictReader(open(root / "two" / "metrics.csv")))) == 1  # rank 0 alone writes


def test_ddp_resumes_a_run_and_continues_like_one_process(runs, shapes_csv):
    root, _ = runs
    _train(shapes_csv, root / "one_2", "trainer.max_steps=2")
    _train(shapes_csv, root / "resumed", "trainer.max_steps=2", f"trainer.resume={root / 'two' / 'last'}",
           processes=2)
    assert "resumed from" in (root / "resumed" / "train.log").read_text()
    # one_2's train_loss is the mean of its two steps; the resumed run's is its second step alone.
    second_step = 2 * _loss(root / "one_2") - _loss(root / "one")
    assert _loss(root / "resumed") == pytest.approx(second_step, rel=1e-5)
    _assert_same_weights(root / "one_2" / "last", root / "resumed" / "last")


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_shards_split_every_global_batch_without_overlap(world_size):
    count, batch = 50, 12
    shards = [Shard(rank, world_size).positions(count, batch) for rank in range(world_size)]
    local = batch // world_size
    for b in range(count // batch):
        together = torch.cat([s[b * local : (b + 1) * local] for s in shards])
        assert sorted(together.tolist()) == list(range(b * batch, (b + 1) * batch))
    with pytest.raises(ValueError, match="divide evenly"):
        Shard(0, 5).local_batch_size(batch)


def test_local_rows_against_the_global_batch_add_up_to_the_batch_loss():
    torch.manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(6, 4), dim=1) for _ in range(2))
    scale = torch.tensor(2.0)
    captions = torch.tensor([0, 1, 1, 2, 3, 0])
    positives = captions[:, None] == captions[None, :]
    whole = contrastive_loss(image, text, scale, positives)
    parts = [contrastive_loss(image[r], text[r], scale, positives[r], image, text, r.start)
             for r in (slice(0, 2), slice(2, 6))]
    torch.testing.assert_close(whole, (2 * parts[0] + 4 * parts[1]) / 6)
    plain = contrastive_loss(image, text, scale)
    torch.testing.assert_close(plain, (contrastive_loss(image[:3], text[:3], scale, None, image, text, 0)
                                       + contrastive_loss(image[3:], text[3:], scale, None, image, text, 3)) / 2)

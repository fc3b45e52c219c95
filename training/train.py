"""Train the dual encoder: `python -m training.train model=effnet_minilm data=openclipart ...`.

Every option is a Hydra override of configs/train.yaml; the run folder (printed at the end)
holds the resolved config, metrics.csv and the best/ and last/ checkpoints.

Data-parallel on several processes or GPUs, same overrides (training/distributed.py):
`torchrun --standalone --nproc_per_node=2 -m training.train ...`. Rank 0 owns the run folder
and the log; the other ranks write nothing and log only errors.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from data.errors import DataUnavailableError
from training.pretrained import WeightsUnavailableError

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from training.distributed import Distributed
    from training.loop import Trainer

    dist = Distributed.from_env(cfg.trainer.device)
    run_dir = dist.broadcast(HydraConfig.get().runtime.output_dir)  # rank 0's folder
    log.info("run folder: %s", run_dir)
    log.info("%s", dist.describe())
    try:
        # .hydra/config.yaml keeps interpolations (${data.csv}, ${oc.env:HOME}); this is what ran.
        resolved = OmegaConf.to_yaml(cfg, resolve=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as error:
        log.error("a required setting is missing (%s): set it on the command line, e.g. data.csv=/path/captions.csv",
                  str(error).splitlines()[0])
        sys.exit(2)
    if dist.is_main:
        (Path(run_dir) / "resolved_config.yaml").write_text(resolved)
    try:
        trainer = Trainer(cfg, run_dir, dist)
        metrics = trainer.fit()
    except (DataUnavailableError, WeightsUnavailableError) as error:
        log.error("%s", error)
        sys.exit(2)
    finally:
        dist.close()
    log.info("final: %s", OmegaConf.to_yaml(OmegaConf.create({k: v for k, v in metrics.items()})))
    log.info("best checkpoint: %s/best  (evaluate: python -m evaluation.evaluate checkpoint=%s/best)", run_dir, run_dir)
    return metrics.get(cfg.trainer.monitor)


def _quiet_unless_rank_zero() -> None:
    """torchrun ranks other than 0: no Hydra run folder or log file of their own (rank 0's is the run's)."""
    if int(os.environ.get("RANK", "0")) != 0:
        os.environ.setdefault("TQDM_DISABLE", "1")
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                     "hydra/hydra_logging=disabled"]


if __name__ == "__main__":
    _quiet_unless_rank_zero()
    main()

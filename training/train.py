"""Train the dual encoder: `python -m training.train model=effnet_minilm data=openclipart ...`.

Every option is a Hydra override of configs/train.yaml; the run folder (printed at the end)
holds the resolved config, metrics.csv and the best/ and last/ checkpoints.
"""

from __future__ import annotations

import logging
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
    from training.loop import Trainer

    run_dir = HydraConfig.get().runtime.output_dir
    log.info("run folder: %s", run_dir)
    try:
        # .hydra/config.yaml keeps interpolations (${data.csv}, ${oc.env:HOME}); this is what ran.
        resolved = OmegaConf.to_yaml(cfg, resolve=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as error:
        log.error("a required setting is missing (%s): set it on the command line, e.g. data.csv=/path/captions.csv",
                  str(error).splitlines()[0])
        sys.exit(2)
    (Path(run_dir) / "resolved_config.yaml").write_text(resolved)
    try:
        trainer = Trainer(cfg, run_dir)
        metrics = trainer.fit()
    except (DataUnavailableError, WeightsUnavailableError) as error:
        log.error("%s", error)
        sys.exit(2)
    log.info("final: %s", OmegaConf.to_yaml(OmegaConf.create({k: v for k, v in metrics.items()})))
    log.info("best checkpoint: %s/best  (evaluate: python -m evaluation.evaluate checkpoint=%s/best)", run_dir, run_dir)
    return metrics.get(cfg.trainer.monitor)


if __name__ == "__main__":
    main()

"""Every checkpoint on every domain, one table: `python -m evaluation.suite checkpoints=[A,B] [names=[a,b]]`.

    python -m evaluation.suite checkpoints=[runs/zeroshot,runs/heads/best] names=[zeroshot,heads]
    python -m evaluation.suite checkpoint=runs/heads/best only=[openclipart,twemoji] split=val
    python -m evaluation.suite checkpoint=CKPT '+domains.mine={data:captions_csv,overrides:{csv:/d/x.csv,name:mine}}'

The domains are configured in configs/suite.yaml (evaluation.domains); `only=[a,b]` (or
`domains=[a,b]`) picks some of them. Each domain's split is read once and each checkpoint
loaded once. Writes suite.md and suite.json into output_dir (evaluation.suite_report).

Checkpoints with a fully frozen image or text encoder share its features: one backbone pass per
(domain, backbone key) for all of them (evaluation.backbone_keys, evaluation.shared_features).
Domains are the outer loop: a domain's features are kept (float32, in memory) while its
checkpoints are scored, then freed. The checkpoints with a frozen side stay loaded for the run,
one encoder module per backbone; one with nothing frozen is evaluated end to end on every domain
(evaluation.retrieval.evaluate_checkpoint, as `evaluation.evaluate`) right when it is loaded,
then freed. The numbers are those of `evaluation.evaluate` either way (tests/test_suite.py).
"""

from __future__ import annotations

import gc
import logging
import re
import sys

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from evaluation.backbone_keys import Backbones, backbones_of, log_sharing, share_encoders
from evaluation.cli import CliError, as_list, configure_torch, evaluation_kwargs, expected_errors, load
from evaluation.compare import default_names, unique
from evaluation.domains import CONFIG_DIR, Domain, read_domain, selected_domains
from evaluation.retrieval import EvaluationError, evaluate_checkpoint
from evaluation.shared_features import BackboneFeatures, evaluate_with_backbones
from evaluation.suite_report import SUITE_MD, checkpoint_row, record, suite_payload, summarize, write_suite
from training.checkpoint import read_checkpoint_config

log = logging.getLogger("evaluation")


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_suite(cfg: DictConfig) -> dict:
    """Evaluate every checkpoint on every available domain; returns what suite.json holds."""
    configure_torch(cfg)
    paths = as_list(cfg.get("checkpoints")) or as_list(cfg.get("checkpoint"))
    if not paths:
        raise CliError("checkpoints=[A,B,...] (or checkpoint=A) needs at least one checkpoint directory")
    names = as_list(cfg.get("names")) or default_names(paths)
    if len(names) != len(paths):
        raise CliError(f"names has {len(names)} entries for {len(paths)} checkpoints")
    names = unique(names)
    kwargs = evaluation_kwargs(cfg)
    kwargs["ks"] = tuple(sorted(set(kwargs["ks"]) | {1, 10}))
    kwargs["progress"] = False  # one bar over domains x checkpoints instead
    configs = [read_checkpoint_config(path) for path in paths]  # fail fast on a wrong path
    specs = selected_domains(cfg)

    domains = [read_domain(name, spec, str(cfg.split)) for name, spec in specs.items()]
    if not any(d.available for d in domains):
        raise CliError("none of the domains is available: "
                       + "; ".join(f"{d.name}: {d.reason}" for d in domains))
    rows = [checkpoint_row(name, path, config) for name, path, config in zip(names, paths, configs)]

    total = len(rows) * sum(d.available for d in domains)
    with tqdm(total=total, desc="suite", unit="eval", disable=not cfg.progress, dynamic_ncols=True) as bar:
        def run(row: dict, domain: Domain, evaluate, *args) -> None:
            """`evaluate(*args, domain's samples...)` into the row (a domain none of whose images can
            be read becomes not available, for every row)."""
            bar.set_postfix_str(f"{row['name']} on {domain.name}")
            try:
                result = evaluate(*args, dataset=domain.name, split=domain.split,
                                  data_config=domain.data_config, **kwargs)
            except EvaluationError as error:  # e.g. none of its images readable: the same for every row
                domain.mark_unavailable(str(error))
                return
            record(row, domain, summarize(result))
            bar.update(1)

        # Load every checkpoint once. One with nothing frozen is evaluated on every domain right away
        # and freed; the others stay loaded (one module per frozen backbone) for the domain-major pass.
        shared: list[tuple[dict, Backbones, object]] = []
        alone: list[str] = []
        encoders: dict[tuple[str, str], torch.nn.Module] = {}
        for row, path in zip(rows, paths):
            checkpoint = load(cfg, path)
            row["model_id"] = checkpoint.model_id
            backbones = backbones_of(checkpoint)
            row["image_backbone"], row["text_backbone"] = backbones.image, backbones.text
            if backbones.any:
                share_encoders(checkpoint, backbones, encoders)
                shared.append((row, backbones, checkpoint))
                continue
            alone.append(row["name"])
            for domain in domains:
                if domain.available:
                    run(row, domain, evaluate_checkpoint, checkpoint, domain.samples)
            del checkpoint  # free the model before loading the next one
            _free_memory()
        log_sharing([(row["name"], backbones) for row, backbones, _ in shared], alone)

        # Domains outermost: each frozen backbone's features once per domain, for all its checkpoints.
        for domain in domains:
            if not domain.available or not shared:
                continue
            features = BackboneFeatures()
            for row, backbones, checkpoint in shared:
                if not domain.available:
                    break
                run(row, domain, evaluate_with_backbones, checkpoint, domain.samples, backbones, features)
            log.info("%s: %d image and %d text backbone passes for %d checkpoints", domain.name,
                     features.image_passes, features.text_passes, len(shared))
            del features
            _free_memory()
        shared = encoders = checkpoint = None  # the models held for the domain-major pass
        _free_memory()

    return suite_payload(str(cfg.split), kwargs["ks"], domains, rows)


def accept_domain_list(argv: list[str]) -> list[str]:
    """`domains=[a,b]` on the command line means only=[a,b] (Hydra cannot merge a list into the mapping)."""
    return [re.sub(r"^domains=", "only=", arg) if re.match(r"^domains=\s*\[", arg) else arg for arg in argv]


# An absolute config path, so that main() also works when imported (tests), not only with -m.
@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="suite")
def _hydra_main(cfg: DictConfig) -> None:
    with expected_errors():
        payload = run_suite(cfg)
    written = write_suite(payload, str(cfg.output_dir))
    text = written[SUITE_MD].read_text(encoding="utf-8")
    print(text.split("\n## Checkpoints")[0].rstrip() + "\n", flush=True)
    log.info("suite: %s", written[SUITE_MD])


def main() -> None:
    """The command line (Hydra overrides of configs/suite.yaml); `domains=[a,b]` means only=[a,b]."""
    sys.argv = accept_domain_list(sys.argv)
    _hydra_main()


if __name__ == "__main__":
    main()

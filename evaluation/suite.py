"""Every checkpoint on every domain, one table: `python -m evaluation.suite checkpoints=[A,B] [names=[a,b]]`.

    python -m evaluation.suite checkpoints=[runs/zeroshot,runs/heads/best] names=[zeroshot,heads]
    python -m evaluation.suite checkpoint=runs/heads/best only=[openclipart,twemoji] split=val
    python -m evaluation.suite checkpoint=CKPT '+domains.mine={data:captions_csv,overrides:{csv:/d/x.csv,name:mine}}'

The domains are configured in configs/suite.yaml (`domains:` name -> {data: <configs/data/ name>
or reader: {...} inline, split: null = the suite's split, overrides: {...} merged into the data
config}); `only=[a,b]` (or `domains=[a,b]`) picks some of them. Each domain's split is read
once and each checkpoint loaded once. A domain whose data is missing is reported as "not
available: <reason>" (a column of n/a), not an error.

Shared frozen backbones: with a fully frozen image encoder (trainable_stages=0: heads-only
models, the zero-shot model, fixed zero-shot readouts) a checkpoint's image embedding is
`model.embed_image_prefix(pooled backbone features)`, and those features depend on the backbone
alone: its weights, pooled_stages, the checkpoint's image preprocessing and precision (the
"image backbone" key, `image_backbone_key`). The suite computes them once per (domain, backbone)
and finishes every checkpoint of that backbone from them; likewise the text side (text encoder
weights and config, pooling, tokenizer, max_tokens). Domains are the outer loop: a domain's
features are kept (float32, in memory) while its checkpoints are scored, then freed. The
checkpoints with a frozen side stay loaded for the run, one encoder module per backbone; one
with nothing frozen is evaluated end to end on every domain (evaluation.retrieval.
evaluate_checkpoint, as `evaluation.evaluate`) right when it is loaded, then freed. The numbers
are those of `evaluation.evaluate` either way (tests/test_suite.py checks it).

Whether a checkpoint trained on a domain comes from its config.json: "datasets" (written by
training.loop), else inferred from "data" (the reader's _target_). Writes into output_dir:

    suite.md    rows = checkpoints, columns = domains ("text->image MRR / R@10", `*` = trained
                on that domain), a held-out mean MRR column, a compact image->text MRR table,
                and "MRR relative to zero-shot" when a row is named `zeroshot` (or its
                config.json says "zeroshot": true)
    suite.json  every number per domain per checkpoint, the domains' pools, training datasets,
                each checkpoint's image / text backbone key (null: not fully frozen)
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.errors import InstantiationException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from data.errors import DataUnavailableError
from data.records import Sample
from evaluation.cli import CliError, configure_torch, evaluation_kwargs, expected_errors, load, load_split
from evaluation.compare import _as_list, default_names, unique
from evaluation.embedding import ImageEmbeddings, embed_image_paths, embed_texts
from evaluation.relevance import CaptionPool
from evaluation.report import markdown_table
from evaluation.retrieval import (
    IMAGE_TO_TEXT,
    TEXT_TO_IMAGE,
    EvalResult,
    EvaluationError,
    evaluate_checkpoint,
    evaluate_embeddings,
)
from training.checkpoint import TOKENIZER_DIR, model_id_of, read_checkpoint_config
from training.features import autocast_for

log = logging.getLogger("evaluation")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SUITE_JSON = "suite.json"
SUITE_MD = "suite.md"
SEEN_MARK = "*"
UNKNOWN_MARK = "?"
ZEROSHOT_NAME = "zeroshot"
DEFAULT_FRACTIONS = [0.8, 0.1, 0.1]
SUMMARY_T2I = ("MRR", "R@1", "R@10", "num_queries", "num_candidates")


# --- domains ----------------------------------------------------------------------------------

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
        chosen = list(dict.fromkeys(_as_list(only)))
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
    try:
        data, domain.source = domain_data_config(name, spec)
        domain.dataset = str(data.get("name", name))
        missing = [key for key in data if OmegaConf.is_missing(data, key)]
        if missing:
            raise CliError("needs " + ", ".join(f"domains.{name}.overrides.{key}=..." for key in missing))
        root = OmegaConf.create({"data": data, "split": split})
        domain.data_config = OmegaConf.to_container(root.data, resolve=True)
        samples, _ = load_split(root)
        domain.samples = samples
    except MissingConfigException:
        domain.reason = f"no data config configs/data/{spec.get('data')}.yaml"
    except InstantiationException as error:
        domain.reason = f"cannot instantiate its reader: {error}"
    except (DataUnavailableError, CliError, EvaluationError, ImportError, OSError, ValueError) as error:
        domain.reason = str(error)
    except Exception as error:  # noqa: BLE001 - OmegaConf resolution errors and the like
        if not type(error).__module__.startswith(("omegaconf", "hydra")):
            raise
        domain.reason = f"bad domain config: {error}"
    if domain.reason:
        domain.reason = " ".join(domain.reason.split())
        log.warning("domain %s not available: %s", name, domain.reason)
    return domain


# --- which datasets a checkpoint trained on -------------------------------------------------------

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


def is_zeroshot(name: str, config: dict) -> bool:
    return name == ZEROSHOT_NAME or config.get("zeroshot") is True


# --- shared frozen backbones ---------------------------------------------------------------------

@dataclass
class Prefixes:
    """Outputs of a fully frozen encoder (its pooled features), float32 on CPU, one row per input."""

    values: torch.Tensor              # [N, F] float32
    dtype: torch.dtype                # what the encoder produced (bf16 under bf16 autocast): fed back as such
    indices: list[int] = field(default_factory=list)         # images: position of each row in the path list
    failures: dict[str, str] = field(default_factory=dict)   # images: path -> reason, for the skipped ones

    def __len__(self) -> int:
        return self.values.shape[0]


@dataclass(frozen=True)
class Backbones:
    """A checkpoint's image and text backbone keys; None for a side that is not fully frozen."""

    image: str | None
    text: str | None

    @property
    def any(self) -> bool:
        return self.image is not None or self.text is not None


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _precision(checkpoint) -> dict:
    """What decides the precision of the forward passes (as LoadedCheckpoint.embed_*)."""
    return {"device": str(checkpoint.device), "bf16": bool(checkpoint.use_bf16)}


def image_backbone_key(checkpoint) -> str | None:
    """What a fully frozen image encoder's output depends on: its weights, architecture and
    pooled_stages, the image preprocessing and the precision. None when it is not fully frozen."""
    encoder = checkpoint.model.image_encoder
    if not encoder.fully_frozen:
        return None
    pre = checkpoint.preprocessing
    arch = (checkpoint.config.get("model") or {}).get("image", {}).get("arch")
    return _digest({"weights": model_id_of(encoder.state_dict()), "arch": arch,
                    "pooled_stages": encoder.pooled_stages, "image_size": pre.image_size,
                    "mean": list(pre.mean), "std": list(pre.std), **_precision(checkpoint)})


# Saved state of a fast tokenizer's last call, not of the tokenizer: data.transforms.tokenize sets
# both on every call (a checkpoint whose readout embedded class names saves other values here).
_TOKENIZER_CALL_STATE = ("truncation", "padding")


def _tokenizer_digest(directory: Path) -> str:
    """The checkpoint's tokenizer files, less the last call's truncation / padding settings."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        content = path.read_bytes()
        if path.name == "tokenizer.json":
            try:
                tokenizer = json.loads(content)
                for key in _TOKENIZER_CALL_STATE:
                    tokenizer.pop(key, None)
                content = json.dumps(tokenizer, sort_keys=True).encode()
            except (ValueError, AttributeError):
                pass
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(content)
    return digest.hexdigest()[:16]


def text_backbone_key(checkpoint) -> str | None:
    """Likewise for the text encoder: weights, BERT config, pooling, tokenizer files, max_tokens, precision."""
    encoder = checkpoint.model.text_encoder
    if not encoder.fully_frozen:
        return None
    config = {key: value for key, value in encoder.config.to_dict().items()
              if not key.startswith("_") and key != "transformers_version"}
    return _digest({"weights": model_id_of(encoder.state_dict()), "config": config, "pooling": encoder.pooling,
                    "tokenizer": _tokenizer_digest(Path(checkpoint.path) / TOKENIZER_DIR),
                    "max_tokens": checkpoint.preprocessing.max_tokens, **_precision(checkpoint)})


def backbones_of(checkpoint) -> Backbones:
    return Backbones(image_backbone_key(checkpoint), text_backbone_key(checkpoint))


def share_encoders(checkpoint, backbones: Backbones, kept: dict[tuple[str, str], torch.nn.Module]) -> None:
    """Checkpoints of one frozen backbone hold one module of it (equal key: equal weights), so
    keeping them all loaded costs one backbone plus their heads."""
    model = checkpoint.model
    if backbones.image is not None:
        model.image_encoder = kept.setdefault(("image", backbones.image), model.image_encoder)
    if backbones.text is not None:
        model.text_encoder = kept.setdefault(("text", backbones.text), model.text_encoder)


def image_prefix_paths(checkpoint, paths: list[str], batch_size: int = 64, num_workers: int = 2,
                       progress: bool = True) -> Prefixes:
    """The fully frozen image encoder's output for every readable image of `paths`: decoded,
    batched, ordered and skipped exactly as evaluation.embedding.embed_image_paths does."""
    encoder = checkpoint.model.image_encoder
    if not encoder.fully_frozen:
        raise ValueError("the image encoder is not fully frozen: its prefix is not the pooled feature vector")
    dtypes: list[torch.dtype] = []

    @torch.inference_mode()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(checkpoint.device, memory_format=torch.channels_last)
        with autocast_for(checkpoint.device, checkpoint.use_bf16):
            prefix = encoder.forward_prefix(pixels)
        dtypes.append(prefix.dtype)
        return prefix.float().cpu()

    images = embed_image_paths(checkpoint, paths, batch_size, num_workers, progress, "image backbone", encode=encode)
    return Prefixes(images.embeddings, dtypes[0] if dtypes else torch.float32, images.indices, images.failures)


def text_prefixes(checkpoint, texts: list[str], batch_size: int = 256, progress: bool = True) -> Prefixes:
    """The fully frozen text encoder's output (pooled) for `texts`, tokenized in the batches of embed_texts."""
    encoder = checkpoint.model.text_encoder
    if not encoder.fully_frozen:
        raise ValueError("the text encoder is not fully frozen: its prefix is not the pooled feature vector")
    dtypes: list[torch.dtype] = []

    @torch.inference_mode()
    def encode(batch: list[str]) -> torch.Tensor:
        tokens = {key: value.to(checkpoint.device) for key, value in checkpoint.tokenize(batch).items()}
        with autocast_for(checkpoint.device, checkpoint.use_bf16):
            prefix = encoder.forward_prefix(tokens["input_ids"], tokens["attention_mask"])
        dtypes.append(prefix.dtype)
        return prefix.float().cpu()

    values = embed_texts(checkpoint, texts, batch_size, progress, "text backbone", encode=encode)
    return Prefixes(values, dtypes[0] if dtypes else torch.float32)


@torch.inference_mode()
def embed_prefixes(checkpoint, embed, prefixes: Prefixes, batch_size: int) -> torch.Tensor:
    """[N, D] float32 unit-norm embeddings: `embed` (model.embed_image_prefix / embed_text_prefix) on
    the prefixes in the dtype the encoder gave them, under the checkpoint's precision."""
    chunks = []
    for start in range(0, len(prefixes), batch_size):
        prefix = prefixes.values[start:start + batch_size].to(checkpoint.device, prefixes.dtype)
        with autocast_for(checkpoint.device, checkpoint.use_bf16):
            chunks.append(embed(prefix).float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, checkpoint.model.embed_dim)


@dataclass
class BackboneFeatures:
    """One domain's frozen backbone outputs, per backbone key: computed by the first checkpoint
    of that backbone, reused by the others, dropped when the domain is done."""

    images: dict[str, Prefixes] = field(default_factory=dict)
    texts: dict[tuple[str, str], Prefixes] = field(default_factory=dict)  # (key, digest of the caption list)
    image_passes: int = 0
    text_passes: int = 0

    def image(self, checkpoint, key: str, paths: list[str], batch_size: int, num_workers: int,
              progress: bool) -> Prefixes:
        if key not in self.images:
            self.images[key] = image_prefix_paths(checkpoint, paths, batch_size, num_workers, progress)
            self.image_passes += 1
        return self.images[key]

    def text(self, checkpoint, key: str, texts: list[str], batch_size: int, progress: bool) -> Prefixes:
        # The caption pool follows the readable images: the same for every image backbone in practice,
        # but keyed by it anyway.
        slot = (key, hashlib.sha256(json.dumps(texts).encode()).hexdigest())
        if slot not in self.texts:
            self.texts[slot] = text_prefixes(checkpoint, texts, batch_size, progress)
            self.text_passes += 1
        return self.texts[slot]


def evaluate_with_backbones(checkpoint, samples: list[Sample], backbones: Backbones, features: BackboneFeatures, *,
                            ks=(1, 5, 10), batch_size: int = 64, text_batch_size: int = 256, num_workers: int = 2,
                            max_queries: int | None = None, seed: int = 0, dataset: str | None = None,
                            split: str | None = None, data_config: dict | None = None,
                            progress: bool = True) -> EvalResult:
    """evaluation.retrieval.evaluate_checkpoint, with a frozen side embedded from `features`
    (computed there once per backbone) and a trainable side end to end as usual."""
    if not samples:
        where = f"split {split!r} of {dataset}" if split or dataset else "the sample list"
        raise EvaluationError(f"{where} is empty: nothing to evaluate (check split / split_fractions / the data path)")
    paths = [s.image_path for s in samples]
    if backbones.image is not None:
        prefixes = features.image(checkpoint, backbones.image, paths, batch_size, num_workers, progress)
        images = ImageEmbeddings(embed_prefixes(checkpoint, checkpoint.model.embed_image_prefix, prefixes, batch_size),
                                 list(prefixes.indices), dict(prefixes.failures))
    else:
        images = embed_image_paths(checkpoint, paths, batch_size, num_workers, progress)
    if len(images) == 0:
        raise EvaluationError(f"none of the {len(samples)} images could be read "
                              f"(first failure: {next(iter(images.failures.values()), '?')})")
    readable = [samples[i] for i in images.indices]
    pool = CaptionPool.from_samples(readable)
    if backbones.text is not None:
        prefixes = features.text(checkpoint, backbones.text, pool.captions, text_batch_size, progress)
        caption_emb = embed_prefixes(checkpoint, checkpoint.model.embed_text_prefix, prefixes, text_batch_size)
    else:
        caption_emb = embed_texts(checkpoint, pool.captions, text_batch_size, progress)
    notes: list[str] = []
    if images.failures:
        notes.append(f"{len(images.failures)} of {len(samples)} images could not be read and were left out")
    directions = evaluate_embeddings(readable, images.embeddings, caption_emb, pool, ks=ks,
                                     max_queries=max_queries, seed=seed, notes=notes)
    return EvalResult(
        model_id=checkpoint.model_id, checkpoint=str(checkpoint.path), dataset=dataset, split=split,
        ks=tuple(int(k) for k in ks), samples=readable, captions=pool.captions, directions=directions,
        num_split_images=len(samples), skipped_images=images.failures, max_queries=max_queries, notes=notes,
        data_config=dict(data_config or {}),
    )


def log_sharing(shared: list[tuple[dict, Backbones]], alone: list[str]) -> None:
    """Which checkpoints share a backbone (one pass per domain for all of them)."""
    for side in ("image", "text"):
        groups: dict[str, list[str]] = {}
        for row, backbones in shared:
            key = getattr(backbones, side)
            if key is not None:
                groups.setdefault(key, []).append(row["name"])
        for key, names in groups.items():
            if len(names) > 1:
                log.info("%d checkpoints share %s backbone %s (%s): one %s pass per domain",
                         len(names), side, key, ", ".join(names), side)
            else:
                log.info("%s: frozen %s backbone %s (its own)", names[0], side, key)
        unfrozen = [row["name"] for row, backbones in shared if getattr(backbones, side) is None] + alone
        if unfrozen:
            log.info("%s encoder not fully frozen (embedded end to end): %s", side, ", ".join(unfrozen))


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the run ---------------------------------------------------------------------------------------

def summarize(result: EvalResult) -> dict:
    t2i = result.directions[TEXT_TO_IMAGE].metrics
    i2t = result.directions[IMAGE_TO_TEXT].metrics
    return {
        TEXT_TO_IMAGE: {key: t2i[key] for key in SUMMARY_T2I},
        IMAGE_TO_TEXT: {"MRR": i2t["MRR"], "num_queries": i2t["num_queries"], "num_candidates": i2t["num_candidates"]},
        "num_images_evaluated": len(result.samples),
        "skipped_images": len(result.skipped_images),
        "metrics": {name: dict(direction.metrics) for name, direction in result.directions.items()},
        "notes": list(result.notes),
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def record(row: dict, domain: Domain, entry: dict) -> None:
    """A checkpoint's summary on a domain into its row; the domain's pool comes from the first one."""
    t2i = entry[TEXT_TO_IMAGE]
    pool = {"num_queries": t2i["num_queries"], "num_candidates": t2i["num_candidates"]}
    if not domain.pool:
        domain.pool = pool
    elif domain.pool != pool:
        entry["notes"].append(f"pool {pool} differs from the first checkpoint's {domain.pool}")
    row["domains"][domain.name] = entry
    log.info("%s on %s (%s): text->image MRR %.4f R@1 %.4f R@10 %.4f (%d x %d), image->text MRR %.4f",
             row["name"], domain.name, domain.split, t2i["MRR"], t2i["R@1"], t2i["R@10"],
             t2i["num_queries"], t2i["num_candidates"], entry[IMAGE_TO_TEXT]["MRR"])


def run_suite(cfg: DictConfig) -> dict:
    """Evaluate every checkpoint on every available domain; returns what suite.json holds."""
    configure_torch(cfg)
    paths = _as_list(cfg.get("checkpoints")) or _as_list(cfg.get("checkpoint"))
    if not paths:
        raise CliError("checkpoints=[A,B,...] (or checkpoint=A) needs at least one checkpoint directory")
    names = _as_list(cfg.get("names")) or default_names(paths)
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

    rows = []
    for name, path, config in zip(names, paths, configs):
        datasets, origin = trained_datasets(config)
        rows.append({"name": name, "checkpoint": str(Path(path).expanduser().resolve()),
                     "model_id": config.get("model_id"), "zeroshot": is_zeroshot(name, config),
                     "trained_on": datasets, "trained_on_from": origin,
                     "image_backbone": None, "text_backbone": None, "domains": {}})

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
                domain.reason, domain.samples = " ".join(str(error).split()), None
                log.warning("domain %s not available: %s", domain.name, domain.reason)
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
        log_sharing([(row, backbones) for row, backbones, _ in shared], alone)

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

    available = [d for d in domains if d.available]
    for row in rows:
        row["domains"] = {d.name: row["domains"][d.name] for d in available if d.name in row["domains"]}
        trained = row["trained_on"]
        evaluated = [d for d in available if d.name in row["domains"]]
        for domain in evaluated:
            seen = None if trained is None else bool(domain.aliases & set(trained))
            row["domains"][domain.name]["seen_in_training"] = seen
        row["seen_domains"] = [d.name for d in evaluated if row["domains"][d.name]["seen_in_training"]]
        held_out = [] if trained is None else [d.name for d in evaluated if d.name not in row["seen_domains"]]
        row["held_out_domains"] = held_out if trained is not None else None
        row["held_out_mean_MRR"] = _mean([row["domains"][d][TEXT_TO_IMAGE]["MRR"] for d in held_out])

    payload = {
        "split": str(cfg.split), "ks": list(kwargs["ks"]),
        "domains": {d.name: d.to_dict() for d in domains},
        "checkpoints": rows,
        "relative_to_zeroshot": relative_to_zeroshot(rows, available),
    }
    return payload


def relative_to_zeroshot(rows: list[dict], domains: list[Domain]) -> dict | None:
    """Per domain, every other row's text->image MRR divided by the zero-shot row's."""
    reference = next((row for row in rows if row["zeroshot"]), None)
    if reference is None:
        return None
    ratios: dict[str, dict[str, float | None]] = {}
    for domain in domains:
        base = reference["domains"][domain.name][TEXT_TO_IMAGE]["MRR"]
        ratios[domain.name] = {
            row["name"]: (row["domains"][domain.name][TEXT_TO_IMAGE]["MRR"] / base if base > 0 else None)
            for row in rows if row is not reference}
    return {"reference": reference["name"], "MRR_ratio": ratios}


# --- the report ------------------------------------------------------------------------------------

def _cell(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _short(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def suite_markdown(payload: dict) -> str:
    domains = payload["domains"]
    rows = payload["checkpoints"]
    header = ["checkpoint"] + [f"{name} MRR / R@10" for name in domains] + ["held-out mean MRR"]
    info = ["*split · queries × candidates*"]
    for domain in domains.values():
        info.append(f"{domain['split']} · {domain['num_queries']} × {domain['num_candidates']}"
                    if domain["status"] == "ok" else f"not available: {_short(domain['reason'])}")
    table = [info + [""]]
    for row in rows:
        cells = [row["name"]]
        for name in domains:
            entry = row["domains"].get(name)
            if entry is None:
                cells.append("n/a")
                continue
            seen = entry["seen_in_training"]
            mark = SEEN_MARK if seen else UNKNOWN_MARK if seen is None else ""
            t2i = entry[TEXT_TO_IMAGE]
            cells.append(f"{_cell(t2i['MRR'])} / {_cell(t2i['R@10'])}{mark}")
        held_out = row["held_out_domains"]
        cells.append("–" if not held_out else f"{_cell(row['held_out_mean_MRR'])} ({len(held_out)})")
        table.append(cells)
    lines = [f"# Multi-domain retrieval suite — split {payload['split']}", "",
             "Text → image retrieval on each domain: one query per distinct caption, ranked against every "
             "image of the domain's split (every image carrying the caption is relevant). Cell: MRR / R@10.", "",
             markdown_table(header, table, ["---"] + ["---:"] * (len(header) - 1)), "",
             f"`{SEEN_MARK}` the checkpoint was trained on this domain (its config.json); "
             f"`{UNKNOWN_MARK}` its training data is unknown; no mark: held out. "
             "Held-out mean MRR: mean over the available domains the checkpoint did not train on "
             "(how many in parentheses). n/a: the domain's data is not available."]
    unavailable = {name: d["reason"] for name, d in domains.items() if d["status"] != "ok"}
    if unavailable:
        lines += ["", "Not available:", ""] + [f"- **{name}**: {reason}" for name, reason in unavailable.items()]
    lines += image_to_text_section(payload)
    relative = payload.get("relative_to_zeroshot")
    if relative and relative["MRR_ratio"]:
        available = list(relative["MRR_ratio"])
        others = [row["name"] for row in rows if row["name"] != relative["reference"]]
        if others:
            ratio_rows = [[name] + [("–" if relative["MRR_ratio"][d][name] is None
                                     else f"{relative['MRR_ratio'][d][name]:.2f}×") for d in available]
                          for name in others]
            lines += ["", f"## MRR relative to zero-shot (`{relative['reference']}` = 1.00×)", "",
                      markdown_table(["checkpoint"] + available, ratio_rows, ["---"] + ["---:"] * len(available))]
    lines += ["", "## Checkpoints", "",
              markdown_table(["name", "model id", "trained on", "checkpoint"],
                             [[row["name"], f"`{row['model_id']}`", _trained_label(row), f"`{row['checkpoint']}`"]
                              for row in rows])]
    return "\n".join(lines) + "\n"


def image_to_text_section(payload: dict) -> list[str]:
    """A compact table of image->text MRR (rows = checkpoints, columns = available domains)."""
    rows = payload["checkpoints"]
    available = [name for name, d in payload["domains"].items() if d["status"] == "ok"]
    if not available or not rows:
        return []
    info = ["*queries × candidates*"]
    for name in available:
        entry = next((row["domains"][name][IMAGE_TO_TEXT] for row in rows if name in row["domains"]), None)
        info.append("" if entry is None else f"{entry['num_queries']} × {entry['num_candidates']}")
    table = [info]
    for row in rows:
        cells = [row["name"]]
        for name in available:
            entry = row["domains"].get(name)
            if entry is None:
                cells.append("n/a")
                continue
            seen = entry.get("seen_in_training")
            mark = SEEN_MARK if seen else UNKNOWN_MARK if seen is None else ""
            cells.append(f"{_cell(entry[IMAGE_TO_TEXT]['MRR'])}{mark}")
        table.append(cells)
    return ["", "## Image → text MRR", "",
            "One query per image, ranked against the domain's distinct captions (each of its captions is "
            "relevant). Marks as above.", "",
            markdown_table(["checkpoint"] + available, table, ["---"] + ["---:"] * len(available))]


def _trained_label(row: dict) -> str:
    if row["trained_on"] is None:
        return "unknown"
    label = ", ".join(row["trained_on"]) or "nothing (zero-shot)"
    return label + (" (inferred from its reader)" if row["trained_on_from"] == "data" else "")


def write_suite(payload: dict, output_dir: str | Path) -> dict[str, Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = {SUITE_JSON: output_dir / SUITE_JSON, SUITE_MD: output_dir / SUITE_MD}
    written[SUITE_JSON].write_text(json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n")
    written[SUITE_MD].write_text(suite_markdown(payload), encoding="utf-8")
    return written


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

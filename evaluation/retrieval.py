"""The evaluation itself: embed a split with one checkpoint and score retrieval both ways.

Directions (see DESIGN.md "Retrieval metrics"):

- ``text_to_image``: one query per distinct caption of the readable images; every image that
  carries that exact caption is relevant.
- ``image_to_text``: one query per readable image; every (distinct) caption of it is relevant.
  The candidates are the same distinct captions, so a caption shared by several images is one
  candidate relevant to each of them.
- ``text_to_image_group`` (only when the samples carry at least two groups): the text->image
  queries again, but every image of the query's group is relevant (a category-level MAP).
  A caption's group is the group of the images carrying it; a caption carried by images of
  *different* groups (or only by ungrouped images) has no well-defined group and is skipped
  (counted in ``skipped_queries`` and broken down as ``ambiguous_queries`` / ``ungrouped_queries``).

Images that cannot be read are left out of both pools (counted as ``skipped_images``), and
so are captions that only such images carried. ``max_queries`` evaluates a seeded random
subset of the queries of each direction against the *full* candidate pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from data.records import Sample
from evaluation.embedding import embed_image_paths, embed_texts
from evaluation.metrics import metrics_from_ranks, per_query_ranks, recall_at_k_curve
from evaluation.relevance import CaptionPool, group_relevance


TEXT_TO_IMAGE = "text_to_image"
IMAGE_TO_TEXT = "image_to_text"
TEXT_TO_IMAGE_GROUP = "text_to_image_group"
DIRECTION_TITLES = {
    TEXT_TO_IMAGE: "text → image",
    IMAGE_TO_TEXT: "image → text",
    TEXT_TO_IMAGE_GROUP: "text → image (category level)",
}
TOP_N = 5  # retrieved items kept per query, for the contact sheet and the per-query file


class EvaluationError(ValueError):
    """The evaluation cannot run on this input (empty split, nothing readable...)."""


@dataclass
class DirectionResult:
    """Metrics and per-query outcome of one retrieval direction."""

    name: str
    metrics: dict                     # metrics_from_ranks keys + chance_MRR (+ group extras)
    query_labels: list[str]           # caption text or image id, one per evaluated query
    candidate_labels: list[str]
    query_indices: torch.Tensor       # [Q] index into the direction's full query list
    first_ranks: torch.Tensor         # [Q] int64, 1-based, 0 = no relevant candidate (skipped)
    average_precision: torch.Tensor   # [Q] float64, NaN when skipped
    num_relevant: torch.Tensor        # [Q]
    top_indices: torch.Tensor         # [Q, <=TOP_N] candidate indices, best first
    top_scores: torch.Tensor          # [Q, <=TOP_N] cosine similarities
    best_relevant: torch.Tensor       # [Q] candidate index of the best-scored relevant one, -1 if none
    recall_curve: list[float]         # R@1..R@min(100, candidates)

    @property
    def title(self) -> str:
        return DIRECTION_TITLES.get(self.name, self.name)

    def worst(self, n: int) -> list[int]:
        """Rows of the n worst counted queries: highest first-relevant rank, then lowest AP."""
        rows = (self.first_ranks > 0).nonzero().squeeze(1).tolist()
        rows.sort(key=lambda r: (-int(self.first_ranks[r]), float(self.average_precision[r]), r))
        return rows[:max(0, n)]


@dataclass
class EvalResult:
    """Everything one evaluation produced; `to_dict()` is what metrics.json holds."""

    model_id: str
    checkpoint: str
    dataset: str | None
    split: str | None
    ks: tuple[int, ...]
    samples: list[Sample]             # readable images: image candidates / image->text queries, in order
    captions: list[str]               # distinct captions: text->image queries / image->text candidates
    directions: dict[str, DirectionResult]
    num_split_images: int
    skipped_images: dict[str, str] = field(default_factory=dict)   # path -> reason
    max_queries: int | None = None
    notes: list[str] = field(default_factory=list)
    data_config: dict = field(default_factory=dict)  # how the samples were read (the CLI's data section)

    def to_dict(self) -> dict:
        return {
            "model_id": self.model_id,
            "checkpoint": self.checkpoint,
            "dataset": self.dataset,
            "split": self.split,
            "data_config": dict(self.data_config),
            "ks": list(self.ks),
            "num_images": self.num_split_images,
            "num_images_evaluated": len(self.samples),
            "skipped_images": len(self.skipped_images),
            "skipped_image_reasons": dict(self.skipped_images),
            "num_captions": len(self.captions),
            "max_queries": self.max_queries,
            "directions": {name: dict(d.metrics) for name, d in self.directions.items()},
            "recall_at_k_curve": {name: d.recall_curve for name, d in self.directions.items()},
            "notes": list(self.notes),
        }


def chance_mrr(num_relevant: torch.Tensor, num_candidates: int) -> float:
    """Expected MRR of a random ranking: mean over queries of E[1 / first relevant position].

    With r relevant among C candidates, P(first >= k) = C(C-k+1, r) / C(C, r).
    """
    values = []
    for r, count in zip(*torch.unique(num_relevant[num_relevant > 0], return_counts=True)):
        r, c = int(r), num_candidates
        k = torch.arange(1, c - r + 2, dtype=torch.float64)
        n = c - k + 1
        log_ge = (torch.lgamma(n + 1) - torch.lgamma(n - r + 1)) - (math.lgamma(c + 1) - math.lgamma(c - r + 1))
        ge = log_ge.exp()
        exactly = ge - torch.cat([ge[1:], ge.new_zeros(1)])
        values.append(((exactly / k).sum() * int(count)).item())
    total = int((num_relevant > 0).sum())
    return sum(values) / total if total else math.nan


def _subsample(count: int, max_queries: int | None, seed: int) -> torch.Tensor:
    if not max_queries or max_queries >= count:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:max_queries].sort().values


def score_direction(name: str, query_emb: torch.Tensor, candidate_emb: torch.Tensor, relevance: torch.Tensor,
                    query_labels: list[str], candidate_labels: list[str], ks=(1, 5, 10),
                    query_indices: torch.Tensor | None = None, curve_max_k: int = 100) -> DirectionResult:
    """Rank candidates by cosine similarity for each query and score the ranking."""
    if query_indices is None:
        query_indices = torch.arange(query_emb.shape[0])
    similarity = query_emb[query_indices].float() @ candidate_emb.float().T
    relevance = relevance[query_indices]
    first_ranks, aps = per_query_ranks(similarity, relevance)
    metrics = metrics_from_ranks(first_ranks, aps, similarity.shape[1], ks)
    num_relevant = relevance.sum(dim=1)
    top = similarity.topk(min(TOP_N, similarity.shape[1]), dim=1)
    best_relevant = similarity.masked_fill(~relevance, -math.inf).argmax(dim=1)
    best_relevant[num_relevant == 0] = -1
    metrics["chance_MRR"] = chance_mrr(num_relevant, similarity.shape[1])
    curve = recall_at_k_curve(first_ranks, max_k=min(curve_max_k, similarity.shape[1]))
    return DirectionResult(
        name=name, metrics=metrics, query_labels=[query_labels[i] for i in query_indices.tolist()],
        candidate_labels=candidate_labels, query_indices=query_indices, first_ranks=first_ranks,
        average_precision=aps, num_relevant=num_relevant, top_indices=top.indices, top_scores=top.values,
        best_relevant=best_relevant, recall_curve=curve,
    )


def add_per_pair_metrics(result: DirectionResult, ks) -> None:
    """text->image again, one query per (image, caption) pair instead of per distinct caption.

    This is the protocol of most CLIP papers and of the first Openclipart measurement in
    DESIGN.md. A caption carried by n images then counts n times (its ranking is the same for
    each), so captions shared by many images (collection names, series) weigh far more.
    """
    counted = result.first_ranks > 0
    weights = result.num_relevant[counted].double()
    ranks = result.first_ranks[counted].double()
    total = weights.sum()
    result.metrics["per_pair_queries"] = int(total)
    result.metrics["per_pair_MRR"] = float((weights / ranks).sum() / total)
    for k in ks:
        result.metrics[f"per_pair_R@{k}"] = float((weights * (ranks <= k)).sum() / total)


def caption_groups(pool: CaptionPool, samples: list[Sample]) -> tuple[list[str | None], list[str]]:
    """Group of each caption (None when it has none) and why: "ok", "ambiguous" or "ungrouped"."""
    groups, status = [], []
    for images in pool.image_index:
        found = {samples[i].group for i in images} - {None}
        groups.append(next(iter(found)) if len(found) == 1 else None)
        status.append("ok" if len(found) == 1 else "ambiguous" if found else "ungrouped")
    return groups, status


def evaluate_embeddings(samples: list[Sample], image_emb: torch.Tensor, caption_emb: torch.Tensor,
                        pool: CaptionPool | None = None, ks=(1, 5, 10), max_queries: int | None = None,
                        seed: int = 0, notes: list[str] | None = None) -> dict[str, DirectionResult]:
    """Score both directions (and the category level) from embeddings already computed.

    `image_emb[i]` embeds `samples[i]`; `caption_emb[j]` embeds `pool.captions[j]` where
    `pool = CaptionPool.from_samples(samples)` (built here when not given).
    """
    pool = pool or CaptionPool.from_samples(samples)
    if image_emb.shape[0] != len(samples) or caption_emb.shape[0] != len(pool.captions):
        raise ValueError(f"{image_emb.shape[0]} image embeddings for {len(samples)} samples, "
                         f"{caption_emb.shape[0]} caption embeddings for {len(pool.captions)} captions")
    notes = notes if notes is not None else []
    image_labels = [s.image_id for s in samples]
    t2i_relevance = pool.text_to_image_relevance(len(samples))
    text_queries = _subsample(len(pool.captions), max_queries, seed)
    image_queries = _subsample(len(samples), max_queries, seed)
    results = {
        TEXT_TO_IMAGE: score_direction(TEXT_TO_IMAGE, caption_emb, image_emb, t2i_relevance, pool.captions,
                                       image_labels, ks, text_queries),
        IMAGE_TO_TEXT: score_direction(IMAGE_TO_TEXT, image_emb, caption_emb, t2i_relevance.T.contiguous(),
                                       image_labels, pool.captions, ks, image_queries),
    }
    add_per_pair_metrics(results[TEXT_TO_IMAGE], ks)
    image_groups = [s.group for s in samples]
    num_groups = len({g for g in image_groups if g is not None})
    if num_groups >= 2:
        query_groups, status = caption_groups(pool, samples)
        relevance = group_relevance(query_groups, image_groups)
        try:
            group = score_direction(TEXT_TO_IMAGE_GROUP, caption_emb, image_emb, relevance, pool.captions,
                                    image_labels, ks, text_queries)
        except ValueError as error:  # every query skipped
            notes.append(f"category-level metrics not computed: {error}")
        else:
            evaluated = [status[i] for i in text_queries.tolist()]
            group.metrics.update({"num_groups": num_groups, "ambiguous_queries": evaluated.count("ambiguous"),
                                  "ungrouped_queries": evaluated.count("ungrouped")})
            results[TEXT_TO_IMAGE_GROUP] = group
            if group.metrics["ambiguous_queries"]:
                notes.append(f"category level: {group.metrics['ambiguous_queries']} captions are shared by images "
                             "of different groups and were skipped")
    elif any(g is not None for g in image_groups):
        notes.append("category-level metrics need at least two groups; the split has one")
    return results


def evaluate_checkpoint(checkpoint, samples: list[Sample], *, ks=(1, 5, 10), batch_size: int = 64,
                        text_batch_size: int = 256, num_workers: int = 2, max_queries: int | None = None,
                        seed: int = 0, dataset: str | None = None, split: str | None = None,
                        data_config: dict | None = None, progress: bool = True,
                        image_embedder=None, text_embedder=None) -> EvalResult:
    """Embed `samples` with a loaded checkpoint (training.checkpoint.load_checkpoint) and score retrieval.

    The images are embedded once and serve as candidates (text->image) and queries (image->text).
    `image_embedder(paths) -> ImageEmbeddings` and `text_embedder(texts) -> Tensor` replace the
    checkpoint's own end-to-end embedding (the suite passes ones that reuse shared frozen features).
    """
    if not samples:
        where = f"split {split!r} of {dataset}" if split or dataset else "the sample list"
        raise EvaluationError(f"{where} is empty: nothing to evaluate (check split / split_fractions / the data path)")
    image_embedder = image_embedder or (lambda paths: embed_image_paths(checkpoint, paths, batch_size, num_workers,
                                                                        progress))
    text_embedder = text_embedder or (lambda texts: embed_texts(checkpoint, texts, text_batch_size, progress))
    images = image_embedder([s.image_path for s in samples])
    if len(images) == 0:
        raise EvaluationError(f"none of the {len(samples)} images could be read "
                              f"(first failure: {next(iter(images.failures.values()), '?')})")
    readable = [samples[i] for i in images.indices]
    pool = CaptionPool.from_samples(readable)
    caption_emb = text_embedder(pool.captions)
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

"""Retrieval metrics for image/text search, computed in chunks of queries.

Ranking convention (one pessimistic total order, used by every metric):
candidates are sorted by similarity descending and, among candidates with
*exactly* equal similarity, irrelevant ones come before relevant ones. Ranks are
positions in that order, 1-based. So

    rank(first relevant) = 1 + #(candidates with score > s)
                             + #(irrelevant candidates with score == s)

where s is the best score of any relevant candidate. This is the worst rank the
first relevant item can get under any tie-break, so ties never help a model: a
constant model (all scores equal) puts every relevant item after every
irrelevant one. Tied relevant items are not counted against each other, because
they cannot all be ranked behind each other; this keeps the first-relevant rank
and AP (which reads the positions of all relevant items) on the same order.

Queries with no relevant candidate have no defined rank or AP: they are reported
as rank 0 / AP NaN by `per_query_ranks` and left out of every average.
"""

import math
from typing import Dict, List, Sequence, Tuple

import torch


def _check_inputs(similarity: torch.Tensor, relevance: torch.Tensor, chunk_size: int) -> None:
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be 2-D [queries, candidates], got shape {tuple(similarity.shape)}")
    if relevance.shape != similarity.shape:
        raise ValueError(
            f"relevance shape {tuple(relevance.shape)} != similarity shape {tuple(similarity.shape)}")
    if relevance.dtype != torch.bool:
        # Refuse 0/1 floats etc.: silently thresholding them hides label bugs.
        raise TypeError(f"relevance must be a bool tensor, got {relevance.dtype}")
    if not similarity.is_floating_point():
        raise TypeError(f"similarity must be a floating point tensor, got {similarity.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


# Below this many relevant items per query, counting by comparison (one pass over
# the row per relevant item) beats sorting the row; above it, sort once.
_MAX_REL_FOR_COUNTING = 16


def _count_at_or_above(irr: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """counts[b, j] = #(irr[b, :] >= thresholds[b, j]), without a [B, R, C] temporary."""
    if thresholds.shape[1] <= _MAX_REL_FOR_COUNTING:
        return torch.stack([(irr >= t.unsqueeze(1)).sum(dim=1) for t in thresholds.unbind(1)], dim=1)
    ascending = irr.sort(dim=1).values
    return irr.shape[1] - torch.searchsorted(ascending, thresholds.contiguous(), right=False)


def _chunk_ranks(sim: torch.Tensor, rel: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """First-relevant rank and AP for one chunk of rows (see module docstring).

    In the pessimistic order, the j-th best relevant item (score s_j) comes after
    the j-1 better relevant items and after every irrelevant item scoring >= s_j:

        position_j = j + #(irrelevant with score >= s_j)

    Tied relevant items may be numbered in any order: they get consecutive
    positions either way. Only these counts are needed, not a full sort.
    """
    num_rel = rel.sum(dim=1)
    max_rel = int(num_rel.max()) if rel.numel() else 0
    if max_rel == 0:  # the whole chunk is skipped queries
        return (torch.zeros(sim.shape[0], dtype=torch.int64, device=sim.device),
                torch.full((sim.shape[0],), math.nan, dtype=torch.float64, device=sim.device))

    # Relevant scores, best first, padded to max_rel (padding is masked out below).
    # Comparisons are exact in the input dtype, so no upcast is needed here.
    irr = sim.masked_fill(rel, -math.inf)
    rel_scores = sim.masked_fill(~rel, -math.inf).topk(max_rel, dim=1).values
    # The masked-out relevant items sit at -inf in `irr`; they only get counted
    # when s_j == -inf, where the true answer is all irrelevant items.
    irr_above = _count_at_or_above(irr, rel_scores).minimum((~rel).sum(dim=1, keepdim=True))

    j = torch.arange(1, max_rel + 1, device=sim.device)
    position = j + irr_above
    valid = j <= num_rel.unsqueeze(1)
    has_rel = num_rel > 0

    first_rank = torch.where(has_rel, position[:, 0], torch.zeros_like(position[:, 0]))
    # AP = mean over relevant items of precision at their position; float64 so
    # sums over many relevant items stay accurate.
    precision = torch.where(valid, j.double() / position.double(), torch.zeros((), dtype=torch.float64, device=sim.device))
    ap = precision.sum(dim=1) / num_rel.double()  # NaN (0/0) exactly for skipped queries
    return first_rank, ap


@torch.no_grad()
def per_query_ranks(
        similarity: torch.Tensor,
        relevance: torch.Tensor,
        chunk_size: int = 1024,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-query (first_relevant_rank int64 [Q], average_precision float64 [Q]) on CPU.

    Rank is 1-based (pessimistic ties, see module docstring); queries with no
    relevant candidate get rank 0 and AP NaN. Rows are processed `chunk_size` at
    a time on similarity's device, so peak extra memory is a few chunk-sized
    tensors rather than the whole [Q, C] sort.
    """
    _check_inputs(similarity, relevance, chunk_size)
    similarity = similarity.detach()
    ranks, aps = [], []
    for start in range(0, similarity.shape[0], chunk_size):
        sim = similarity[start:start + chunk_size]
        if torch.isnan(sim).any():
            # NaN has no place in an order; sort() would silently put it first.
            raise ValueError(f"similarity contains NaN in rows {start}..{start + sim.shape[0] - 1}")
        rel = relevance[start:start + chunk_size].to(sim.device)
        rank, ap = _chunk_ranks(sim, rel)
        ranks.append(rank.cpu())
        aps.append(ap.cpu())
    if not ranks:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64)
    return torch.cat(ranks), torch.cat(aps)


def _counted(first_ranks: torch.Tensor) -> torch.Tensor:
    ranks = first_ranks[first_ranks > 0]
    if ranks.numel() == 0:
        # An evaluation where no query has a relevant item is almost surely a labelling bug.
        raise ValueError("no query has a relevant candidate; metrics are undefined")
    return ranks


def recall_at_k_curve(first_ranks: torch.Tensor, max_k: int = 100) -> List[float]:
    """[R@1, ..., R@max_k] over queries with rank > 0 (skipped queries excluded)."""
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    ranks = _counted(first_ranks.cpu().long())
    # Histogram of ranks with everything beyond max_k in one overflow bin.
    hist = torch.bincount(ranks.clamp(max=max_k + 1), minlength=max_k + 2)
    hits = hist[1:max_k + 1].cumsum(0).double() / ranks.numel()
    return hits.tolist()


def _check_ks(ks: Sequence[int]) -> None:
    for k in ks:
        if int(k) != k or k < 1:
            raise ValueError(f"ks must be positive integers, got {k!r}")


def retrieval_metrics(
        similarity: torch.Tensor,
        relevance: torch.Tensor,
        ks: Sequence[int] = (1, 5, 10),
        chunk_size: int = 1024,
) -> Dict[str, float]:
    """Recall@k, MRR, MAP and first-relevant rank statistics as plain Python numbers.

    Keys: "R@{k}" for k in ks, "MRR", "MAP", "median_rank", "mean_rank",
    "num_queries" (queries with >= 1 relevant candidate, the ones averaged),
    "num_candidates", "skipped_queries" (queries with no relevant candidate).
    """
    _check_ks(ks)  # before the ranking, the expensive part
    first_ranks, aps = per_query_ranks(similarity, relevance, chunk_size)
    return metrics_from_ranks(first_ranks, aps, int(similarity.shape[1]), ks)


def metrics_from_ranks(
        first_ranks: torch.Tensor,
        aps: torch.Tensor,
        num_candidates: int,
        ks: Sequence[int] = (1, 5, 10),
) -> Dict[str, float]:
    """`retrieval_metrics` from the output of `per_query_ranks`, for callers that also need
    the per-query ranks (ranking is the expensive part; do it once)."""
    _check_ks(ks)
    counted = first_ranks > 0
    ranks = _counted(first_ranks).double()
    n = ranks.numel()

    sorted_ranks = ranks.sort().values
    median = (sorted_ranks[(n - 1) // 2] + sorted_ranks[n // 2]) / 2  # mean of the two middles if n is even

    metrics = {f"R@{int(k)}": (ranks <= k).double().mean().item() for k in ks}
    metrics.update({
        "MRR": ranks.reciprocal().mean().item(),
        "MAP": aps[counted].mean().item(),
        "median_rank": median.item(),
        "mean_rank": ranks.mean().item(),
        "num_queries": int(n),
        "num_candidates": int(num_candidates),
        "skipped_queries": int(first_ranks.numel() - n),
    })
    return metrics

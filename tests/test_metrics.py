"""Tests for evaluation.metrics (CPU, fast)."""

import json
import math

import pytest
import torch
from sklearn.metrics import average_precision_score

import evaluation.metrics as metrics_module
from evaluation.metrics import per_query_ranks, recall_at_k_curve, retrieval_metrics


@pytest.fixture(autouse=True, params=["count", "sort"])
def count_strategy(request, monkeypatch):
    """Run every test through both ways of counting irrelevant items above a score."""
    threshold = 10**9 if request.param == "count" else 0
    monkeypatch.setattr(metrics_module, "_MAX_REL_FOR_COUNTING", threshold)


def _t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def _naive_pessimistic(sim_row, rel_row):
    """Reference: explicit sort by (score desc, relevant last), then read positions."""
    items = sorted(zip(sim_row.tolist(), rel_row.tolist()), key=lambda x: (-x[0], x[1]))
    positions = [i + 1 for i, (_, r) in enumerate(items) if r]
    if not positions:
        return 0, math.nan
    ap = sum((j + 1) / p for j, p in enumerate(positions)) / len(positions)
    return positions[0], ap


def _random_case(q, c, seed, discrete=False):
    g = torch.Generator().manual_seed(seed)
    if discrete:  # few distinct values -> many ties
        sim = torch.randint(0, 4, (q, c), generator=g).float()
    else:
        sim = torch.rand(q, c, generator=g, dtype=torch.float64)
    rel = torch.rand(q, c, generator=g) < 0.2
    rel[:, 0] |= ~rel.any(dim=1)  # at least one relevant per query
    return sim, rel


# ---------------------------------------------------------------- hand-computed

def test_single_relevant():
    # order: 0.9 (irr), 0.5 (rel) -> rank 2
    sim = _t([[0.9, 0.1, 0.5, 0.3]])
    rel = torch.tensor([[False, False, True, False]])
    m = retrieval_metrics(sim, rel, ks=(1, 2, 5))
    assert m["R@1"] == 0.0 and m["R@2"] == 1.0 and m["R@5"] == 1.0
    assert m["MRR"] == pytest.approx(0.5)
    assert m["MAP"] == pytest.approx(0.5)
    assert m["mean_rank"] == 2.0 and m["median_rank"] == 2.0
    assert m["num_queries"] == 1 and m["num_candidates"] == 4 and m["skipped_queries"] == 0


def test_several_relevant():
    # relevant at positions 1, 3, 5:
    # AP = (1/1 + 2/3 + 3/5) / 3 = (15/15 + 10/15 + 9/15) / 3 = 34/45
    sim = _t([[0.9, 0.8, 0.7, 0.6, 0.5]])
    rel = torch.tensor([[True, False, True, False, True]])
    ranks, aps = per_query_ranks(sim, rel)
    assert ranks.tolist() == [1]
    assert aps.item() == pytest.approx(34 / 45, abs=1e-12)
    m = retrieval_metrics(sim, rel)
    assert m["MAP"] == pytest.approx(34 / 45, abs=1e-12)
    assert m["MRR"] == 1.0


def test_constant_similarity_one_relevant_is_last():
    sim = torch.full((1, 4), 0.3)
    rel = torch.tensor([[False, True, False, False]])
    m = retrieval_metrics(sim, rel, ks=(1, 3, 4))
    assert m["mean_rank"] == 4.0
    assert m["MRR"] == pytest.approx(0.25)
    assert m["MAP"] == pytest.approx(0.25)
    assert m["R@1"] == 0.0 and m["R@3"] == 0.0 and m["R@4"] == 1.0


def test_ties_with_several_relevant():
    # All tied, 2 relevant of 4: irrelevant first -> relevant at positions 3, 4.
    # first rank 3, AP = (1/3 + 2/4) / 2 = 5/12
    sim = torch.zeros(1, 4)
    rel = torch.tensor([[True, False, True, False]])
    ranks, aps = per_query_ranks(sim, rel)
    assert ranks.tolist() == [3]
    assert aps.item() == pytest.approx(5 / 12, abs=1e-12)

    # Partial tie: 0.9 (irr) | 0.5 x3 (rel, irr, rel) | 0.1 (irr)
    # tie group occupies positions 2..4, irrelevant first -> relevant at 3, 4.
    sim = _t([[0.5, 0.9, 0.5, 0.5, 0.1]])
    rel = torch.tensor([[True, False, False, True, False]])
    ranks, aps = per_query_ranks(sim, rel)
    assert ranks.tolist() == [3]
    assert aps.item() == pytest.approx(5 / 12, abs=1e-12)


def test_query_without_relevant_is_skipped():
    sim = _t([[0.9, 0.1, 0.5], [0.2, 0.3, 0.4], [0.1, 0.2, 0.3]])
    rel = torch.tensor([[True, False, False], [False, False, False], [False, False, True]])
    ranks, aps = per_query_ranks(sim, rel)
    assert ranks.tolist() == [1, 0, 1]
    assert math.isnan(aps[1].item())
    m = retrieval_metrics(sim, rel)
    assert m["num_queries"] == 2 and m["skipped_queries"] == 1
    assert m["MRR"] == 1.0 and m["MAP"] == 1.0 and m["R@1"] == 1.0


def test_result_is_plain_json():
    sim, rel = _random_case(7, 11, seed=0)
    m = retrieval_metrics(sim, rel)
    json.dumps(m, allow_nan=False)
    for key in ("num_queries", "num_candidates", "skipped_queries"):
        assert type(m[key]) is int
    for key in ("R@1", "R@5", "R@10", "MRR", "MAP", "median_rank", "mean_rank"):
        assert type(m[key]) is float


def test_median_of_even_count_is_mean_of_middles():
    # first ranks 1 and 2 -> median 1.5
    sim = _t([[0.9, 0.1], [0.9, 0.1]])
    rel = torch.tensor([[True, False], [False, True]])
    m = retrieval_metrics(sim, rel)
    assert m["median_rank"] == 1.5 and m["mean_rank"] == 1.5


# --------------------------------------------------------- independent checks

def test_matches_sklearn_ap_and_naive_mrr():
    sim, rel = _random_case(40, 57, seed=1)
    ranks, aps = per_query_ranks(sim, rel, chunk_size=16)
    rr = []
    for i in range(sim.shape[0]):
        expected_ap = average_precision_score(rel[i].numpy(), sim[i].numpy())
        assert aps[i].item() == pytest.approx(expected_ap, abs=1e-6)
        order = sorted(range(sim.shape[1]), key=lambda j: -sim[i, j].item())
        first = next(pos for pos, j in enumerate(order, start=1) if rel[i, j])
        assert ranks[i].item() == first
        rr.append(1.0 / first)
    m = retrieval_metrics(sim, rel)
    assert m["MRR"] == pytest.approx(sum(rr) / len(rr), abs=1e-6)
    assert m["MAP"] == pytest.approx(aps.mean().item(), abs=1e-6)


@pytest.mark.parametrize("seed", [2, 3])
def test_ties_match_naive_pessimistic_sort(seed):
    sim, rel = _random_case(30, 25, seed=seed, discrete=True)
    rel[-1] = False  # include a skipped query
    ranks, aps = per_query_ranks(sim, rel, chunk_size=7)
    for i in range(sim.shape[0]):
        exp_rank, exp_ap = _naive_pessimistic(sim[i], rel[i])
        assert ranks[i].item() == exp_rank
        if math.isnan(exp_ap):
            assert math.isnan(aps[i].item())
        else:
            assert aps[i].item() == pytest.approx(exp_ap, abs=1e-12)


@pytest.mark.parametrize("discrete", [False, True])
def test_chunked_equals_unchunked(discrete):
    sim, rel = _random_case(23, 31, seed=4, discrete=discrete)
    rel[5] = False
    r_small, ap_small = per_query_ranks(sim, rel, chunk_size=3)
    r_big, ap_big = per_query_ranks(sim, rel, chunk_size=10_000)
    assert torch.equal(r_small, r_big)
    torch.testing.assert_close(ap_small, ap_big, rtol=0, atol=0, equal_nan=True)
    assert retrieval_metrics(sim, rel, chunk_size=3) == retrieval_metrics(sim, rel, chunk_size=10_000)


def test_map_equals_mrr_with_one_relevant_per_query():
    g = torch.Generator().manual_seed(5)
    sim = torch.randint(0, 5, (50, 20), generator=g).float()  # ties included
    rel = torch.zeros(50, 20, dtype=torch.bool)
    rel[torch.arange(50), torch.randint(0, 20, (50,), generator=g)] = True
    m = retrieval_metrics(sim, rel)
    assert m["MAP"] == pytest.approx(m["MRR"], abs=1e-12)


def test_constant_model_never_looks_good():
    g = torch.Generator().manual_seed(6)
    q, c = 20, 10
    sim = torch.ones(q, c)
    rel = torch.rand(q, c, generator=g) < 0.5
    rel[:, 0] = True   # >= 1 relevant
    rel[:, 1] = False  # >= 1 irrelevant
    m = retrieval_metrics(sim, rel, ks=(1,))
    assert m["R@1"] == 0.0
    ranks, _ = per_query_ranks(sim, rel)
    # first relevant comes right after every irrelevant candidate
    assert torch.equal(ranks, (~rel).sum(dim=1) + 1)


def test_recall_curve_monotone_and_consistent():
    sim, rel = _random_case(60, 40, seed=7)
    rel[0] = False
    ks = (1, 5, 10, 40)
    m = retrieval_metrics(sim, rel, ks=ks)
    ranks, _ = per_query_ranks(sim, rel)
    curve = recall_at_k_curve(ranks, max_k=50)
    assert len(curve) == 50
    assert all(a <= b for a, b in zip(curve, curve[1:]))
    for k in ks:
        assert curve[k - 1] == pytest.approx(m[f"R@{k}"], abs=1e-12)
    assert curve[-1] == 1.0  # max_k >= num_candidates: every counted query is found


# ------------------------------------------------------------------ input errors

def test_bad_inputs_raise():
    sim = torch.rand(3, 4)
    rel = torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError):
        per_query_ranks(sim, rel[:, :3])
    with pytest.raises(TypeError):
        per_query_ranks(sim, rel.float())
    with pytest.raises(ValueError):
        per_query_ranks(sim, rel, chunk_size=0)
    bad = sim.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError):
        per_query_ranks(bad, rel)
    with pytest.raises(ValueError):  # nothing to average
        retrieval_metrics(sim, torch.zeros(3, 4, dtype=torch.bool))

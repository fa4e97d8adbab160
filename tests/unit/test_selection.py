"""The pure selection functions against brute-force definitions."""

import itertools
import math

import pytest
import torch

from gastune.selection import alignment_scores, choose_samples, selection_probs, standardize


def test_standardize_matches_definition():
    a = torch.tensor([1.0, 2.0, 4.0, -3.0])
    z = standardize(a)
    expected = (a.double() - a.double().mean()) / (a.double().std(unbiased=False) + 1e-8)
    assert torch.allclose(z, expected)
    assert torch.equal(standardize(torch.full((5,), 3.0)), torch.zeros(5, dtype=torch.float64))


def test_probs_are_softmax_of_standardized_scores_over_temperature():
    a = torch.tensor([0.3, -1.0, 2.0, 0.0])
    p = selection_probs(a, temperature=0.5)
    z = standardize(a) / 0.5
    assert torch.allclose(p, torch.exp(z) / torch.exp(z).sum())
    assert math.isclose(p.sum().item(), 1.0, rel_tol=1e-12)


def _exact_inclusion(p: list[float], k: int) -> list[float]:
    """P(i chosen) for sequential sampling without replacement, by enumerating orders."""
    n = len(p)
    incl = [0.0] * n
    for order in itertools.permutations(range(n), k):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        for i in order:
            incl[i] += prob
    return incl


def test_softmax_draw_has_the_exact_inclusion_probabilities():
    scores = torch.tensor([1.5, 0.2, -0.7, 0.9, -2.0])
    k, trials = 2, 20000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(trials):
        chosen = choose_samples(scores, k, "softmax", generator=g)
        assert len(set(chosen.tolist())) == k
        counts[chosen] += 1
    expected = torch.tensor(_exact_inclusion(selection_probs(scores).tolist(), k))
    assert torch.allclose(counts / trials, expected.float(), atol=0.015)


def test_topk_and_random_and_invalid_scores():
    scores = torch.tensor([0.1, float("nan"), 3.0, 2.0, float("inf")])
    assert choose_samples(scores, 2, "topk").tolist() == [2, 3]
    g = torch.Generator().manual_seed(1)
    for mode in ("softmax", "random"):
        for _ in range(50):
            chosen = choose_samples(scores, 3, mode, generator=g).tolist()
            assert 1 not in chosen and 4 not in chosen
    # fewer finite scores than k: all finite ones
    assert choose_samples(torch.tensor([float("nan"), 1.0]), 2, "softmax", generator=g).tolist() == [1]
    assert choose_samples(torch.tensor([float("nan")]), 1, "softmax").numel() == 0


def test_same_generator_seed_same_choice():
    s = torch.randn(16)
    a = choose_samples(s, 8, generator=torch.Generator().manual_seed(5))
    b = choose_samples(s, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_alignment_scores_dot_and_cosine():
    g1 = torch.randn(4, 3, 2)
    g2 = torch.randn(4, 5)
    s1, s2 = torch.randn(3, 2), torch.randn(5)
    dot = alignment_scores([g1, g2], [s1, s2], "dot")
    flat = torch.cat([g1.reshape(4, -1), g2], dim=1).double()
    sflat = torch.cat([s1.reshape(-1), s2]).double()
    assert torch.allclose(dot, flat @ sflat)
    cos = alignment_scores([g1, g2], [s1, s2], "cosine")
    assert torch.allclose(cos, torch.nn.functional.cosine_similarity(flat, sflat[None], dim=1))
    with pytest.raises(ValueError):
        alignment_scores([g1], [s1], "l2")

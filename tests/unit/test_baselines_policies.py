"""Pure selection functions of the baselines, against numbers worked out by hand or by brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gastune.selection.data_policies import greats_greedy, keep_count, random_rows, top_rows
from gastune.selection.layer_policies import (
    column_mask,
    count_or_fraction,
    fisher_layer_scores,
    ist_active_layers,
    ist_probe_sets,
    ist_score_update,
    layers_for_fraction,
    row_mask,
    top_layers,
    uniform_layers,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- layer counts and masks
def test_layer_counts_follow_ists_int_rule():
    assert layers_for_fraction(0.25, 32) == 8 and layers_for_fraction(0.5, 32) == 16  # LLaMA-7B
    assert layers_for_fraction(0.25, 30) == 7  # int(), not round()
    assert layers_for_fraction(0.25, 3) == 1  # the official code would train nothing
    assert count_or_fraction(2, 4) == 2 and count_or_fraction(0.5, 6) == 3
    with pytest.raises(ValueError):
        count_or_fraction(5, 4)
    with pytest.raises(ValueError):
        layers_for_fraction(0.0, 4)


def test_masks_have_the_right_shape_and_sparsity():
    cols = column_mask(6, 8, torch.tensor([1, 5]))
    assert cols.shape == (6, 8) and cols.sum() == 12
    assert cols[:, [1, 5]].all() and set(cols.sum(dim=0).tolist()) == {0, 6}
    rows = row_mask(6, 8, torch.tensor([0, 2, 3]))
    assert rows.shape == (6, 8) and rows.sum() == 24 and set(rows.sum(dim=1).tolist()) == {0, 8}


@pytest.mark.parametrize(
    "n,fraction,expected", [(16, 0.5, 8), (4, 0.5, 2), (5, 0.5, 2), (1, 0.5, 1), (8, 1.0, 8)]
)
def test_keep_count(n, fraction, expected):
    assert keep_count(fraction, n) == expected


# ---------------------------------------------------------------- draws: shape, distinctness, determinism
def test_layer_draws_are_distinct_sorted_and_seeded():
    for draw in (
        lambda g: uniform_layers(10, 3, g),
        lambda g: ist_active_layers(torch.linspace(-2, 2, 10), 3, g),
        lambda g: random_rows(10, 3, g),
    ):
        a, b = draw(gen(1)), draw(gen(1))
        assert torch.equal(a, b) and len(set(a.tolist())) == 3 and torch.equal(a, a.sort().values)
        assert any(not torch.equal(draw(gen(1)), draw(gen(s))) for s in range(2, 6))


def test_ist_draw_weights_are_sigmoid_of_minus_score():
    """Layer 0 (s = −5) is almost always trained, layer 1 (s = +5) almost never."""
    scores = torch.tensor([-5.0, 5.0, 0.0, 0.0])
    g = gen(0)
    counts = torch.zeros(4)
    for _ in range(400):
        counts[ist_active_layers(scores, 1, g)] += 1
    p = torch.sigmoid(-scores)
    assert torch.allclose(counts / 400, p / p.sum(), atol=0.06)


def test_ist_probe_sets_are_distinct_and_capped():
    scores = torch.zeros(4)
    sets = ist_probe_sets(scores, 2, 3, gen(0))
    assert len(sets) == 3 and len({tuple(s.tolist()) for s in sets}) == 3
    assert all(len(s) == 2 for s in sets)
    # 2 layers, 1 suppressed: only 2 distinct sets exist — the official loop would never end
    assert sorted(tuple(s.tolist()) for s in ist_probe_sets(torch.zeros(2), 1, 3, gen(0))) == [(0,), (1,)]


# ---------------------------------------------------------------- IST score update, by hand
def test_ist_score_update_matches_a_hand_computed_example():
    """s = [0, ln 3, 0, 0] → p = [½, ¾, ½, ½], p(1−p) = [¼, 3/16, ¼, ¼].
    Sets {0,1}, {1,2}, {2,3} with losses ln 2, ln 4, ln 4 → R = [½, ¼, ¼], mean ⅓,
    A = [1/6, −1/12, −1/12]. With lr 10:
      s0 += 10·¼·(1/6)                = 5/12
      s1 += 10·(3/16)·(1/6 − 1/12)    = 5/32     (p_1 taken once, before any update)
      s2 += 10·¼·(−1/12 − 1/12)       = −5/12
      s3 += 10·¼·(−1/12)              = −5/24
    """
    scores = torch.tensor([0.0, math.log(3), 0.0, 0.0], dtype=torch.float64)
    sets = [torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([2, 3])]
    losses = [math.log(2), math.log(4), math.log(4)]
    new = ist_score_update(scores, sets, losses, lr=10.0)
    expected = torch.tensor([5 / 12, math.log(3) + 5 / 32, -5 / 12, -5 / 24], dtype=torch.float64)
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-12)
    assert torch.equal(scores, torch.tensor([0.0, math.log(3), 0.0, 0.0], dtype=torch.float64))  # not mutated
    # equal losses: zero advantage, nothing moves
    assert torch.equal(ist_score_update(scores, sets, [1.0, 1.0, 1.0]), scores)


# ---------------------------------------------------------------- Fisher
def test_fisher_scores_sum_frobenius_norms_and_pick_the_top():
    fisher = [
        [torch.tensor([[3.0, 4.0]]), torch.tensor([0.0])],  # ‖·‖ = 5
        [torch.tensor([1.0]), torch.tensor([1.0, 0.0])],  # 1 + 1 = 2
        [],  # a layer without trainable tensors
        [torch.tensor([[6.0, 8.0]])],  # 10
    ]
    scores = fisher_layer_scores(fisher)
    assert scores.tolist() == [5.0, 2.0, 0.0, 10.0]
    assert top_layers(scores, 2).tolist() == [0, 3]
    assert top_layers(torch.tensor([1.0, 1.0, 1.0]), 2).tolist() == [0, 1]  # ties: lower index


# ---------------------------------------------------------------- data policies
def test_top_rows_keeps_the_largest_and_skips_non_finite():
    scores = torch.tensor([0.5, float("nan"), 2.0, 1.0, float("inf") * 0])
    assert top_rows(scores, 2).tolist() == [2, 3]
    assert top_rows(torch.tensor([1.0, 1.0, 0.0]), 2).tolist() == [0, 1]


def brute_force_greedy(val_dots, gram, k, lr):
    """Maximise lr·⟨g_i, g_val⟩ − lr²·Σ_{j∈S}⟨g_i, g_j⟩ one pick at a time, written plainly."""
    picked: list[int] = []
    for _ in range(k):
        best, best_gain = None, -math.inf
        for i in range(len(val_dots)):
            if i in picked:
                continue
            gain = lr * float(val_dots[i]) - lr**2 * sum(float(gram[i, j]) for j in picked)
            if gain > best_gain:
                best, best_gain = i, gain
        picked.append(best)
    return picked


def test_greats_greedy_uses_the_interaction_term():
    """Samples 0 and 1 are near-duplicates: after picking 0, 1 loses to the less aligned 2."""
    g = torch.tensor([[1.0, 0.0], [0.99, 0.0], [0.0, 0.8]])
    val = torch.tensor([1.0, 0.9])
    dots, gram = g @ val, g @ g.T  # dots = [1, 0.99, 0.72]
    assert greats_greedy(dots, gram, 2, lr=1.0).tolist() == [0, 2]
    assert greats_greedy(dots, gram, 2, lr=0.0).tolist() == [0, 1]  # lr → 0: pure alignment
    assert top_rows(dots, 2).tolist() == [0, 1]


def test_greats_greedy_matches_brute_force_on_random_gradients():
    for seed, lr in itertools.product(range(5), (0.01, 0.3, 2.0)):
        g = torch.randn(8, 5, generator=gen(seed), dtype=torch.float64)
        val = torch.randn(5, generator=gen(seed + 100), dtype=torch.float64)
        dots, gram = g @ val, g @ g.T
        assert greats_greedy(dots, gram, 4, lr).tolist() == brute_force_greedy(dots, gram, 4, lr)

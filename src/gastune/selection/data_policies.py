"""Pure row-selection functions for the data-only online baselines (max-loss, grad-norm,
uniform random half, GREATS).

Shapes: ``N`` candidate samples (the micro-batch), ``K`` kept. A data-selective choice is a
set of rows; as a data × layer mask it sets whole rows. Non-finite scores are never kept
unless nothing else is left.
"""

from __future__ import annotations

import torch


def keep_count(fraction: float, n: int) -> int:
    """Samples kept out of ``n``: ``round(fraction · n)``, at least 1 (½ of 16 → 8)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the kept fraction must be in (0, 1], got {fraction}")
    return min(n, max(1, round(fraction * n)))


def top_rows(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` highest-scoring rows (max-loss, grad-norm); ties go to the lower index.

    Args:
        scores: ``(N,)``.

    Returns:
        Sorted ``(count,)`` int64 row indices on the CPU.
    """
    s = scores.detach().double().cpu()
    s = torch.where(torch.isfinite(s), s, torch.tensor(float("-inf"), dtype=torch.float64))
    order = torch.sort(s, descending=True, stable=True).indices
    return torch.sort(order[:count]).values


def random_rows(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct rows drawn uniformly. Sorted ``(count,)`` int64."""
    return torch.sort(torch.randperm(n, generator=generator)[:count]).values


def greats_greedy(val_dots: torch.Tensor, gram: torch.Tensor, count: int, lr: float) -> torch.Tensor:
    """GREATS' greedy choice with the interaction term.

    The utility of a candidate i given the already picked set S is
    ``lr·⟨g_i, g_val⟩ − lr²·Σ_{j∈S} ⟨g_i, g_j⟩``: take the argmax, subtract its interaction row
    ``lr²·⟨g_·, g_i⟩`` from every candidate, repeat. Dividing the utility by lr > 0 does not
    change any argmax, so we run ``⟨g_i, g_val⟩ − lr·Σ_{j∈S}⟨g_i, g_j⟩``: the same choice for
    every lr > 0, and at lr = 0 (the first warm-up step) its limit, pure validation alignment,
    instead of an all-zero tie.

    Args:
        val_dots: ``(N,)`` ⟨g_i, g_val⟩.
        gram: ``(N, N)`` ⟨g_i, g_j⟩.
        count: samples to keep; lr: the step's learning rate.

    Returns:
        ``(count,)`` int64 row indices in the order they were picked.
    """
    n = val_dots.shape[0]
    if gram.shape != (n, n):
        raise ValueError(f"gram must be ({n}, {n}), got {tuple(gram.shape)}")
    gain = val_dots.detach().double().cpu().clone()
    gram = gram.detach().double().cpu()
    invalid = ~torch.isfinite(gain) | ~torch.isfinite(gram).all(dim=1)
    minus_inf = torch.tensor(float("-inf"), dtype=torch.float64)
    gain[invalid] = minus_inf
    taken = torch.zeros(n, dtype=torch.bool)
    picks: list[int] = []
    for _ in range(min(count, n)):
        free = (~taken).nonzero().squeeze(1)
        i = int(free[torch.argmax(gain[free])])  # the first maximum on ties
        picks.append(i)
        taken[i] = True
        if not invalid[i]:
            gain = gain - lr * gram[:, i]
            gain[invalid] = minus_inf
    return torch.tensor(picks, dtype=torch.long)

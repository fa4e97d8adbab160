"""Pure layer-selection functions for the layer-selective baselines (IST, RST, LISA, Fisher).

Shapes: ``L`` decoder layers (blocks), ``N`` samples in a micro-batch. A layer policy's
choice is a set of active layer indices; as a data × layer mask (see docs/methods.md) it sets
whole columns. All draws are deterministic given their ``generator``.
"""

from __future__ import annotations

from math import comb

import torch


def layers_for_fraction(fraction: float, n_layers: int) -> int:
    """``int(fraction · L)`` as in IST's code (its 25 % and 50 %), at least 1 and at most L.

    IST's code would train no layer at all for L < 4; we keep at least one.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"a layer fraction must be in (0, 1], got {fraction}")
    return min(n_layers, max(1, int(fraction * n_layers)))


def count_or_fraction(value: float, n_layers: int) -> int:
    """A count (an integer ≥ 1, at most L) or a fraction in (0, 1) of the L layers (floor, ≥ 1)."""
    if value >= 1:
        if not float(value).is_integer():
            raise ValueError(f"a layer count must be an integer, got {value}")
        if int(value) > n_layers:
            raise ValueError(f"asked for {int(value)} layers but the model has {n_layers}")
        return int(value)
    return layers_for_fraction(value, n_layers)


def uniform_layers(n_layers: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct layers drawn uniformly (RST, LISA). Sorted ``(count,)`` int64."""
    return torch.sort(torch.randperm(n_layers, generator=generator)[:count]).values


def ist_active_layers(scores: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """IST's trained layers: ``count`` drawn without replacement with weights sigmoid(−s).

    Args:
        scores: ``(L,)`` IST scores (high = less important).

    Returns:
        Sorted ``(count,)`` int64 layer indices (``torch.multinomial`` on the unnormalised
        weights, exactly as the official code does).
    """
    weights = (-scores.double()).sigmoid()
    return torch.sort(torch.multinomial(weights, count, replacement=False, generator=generator)).values


def ist_probe_sets(
    scores: torch.Tensor, size: int, n_sets: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """IST's probe: ``n_sets`` *distinct* sets of ``size`` layers, each drawn with weights sigmoid(s).

    A set equal to one drawn before is redrawn (the official rejection loop). When fewer than
    ``n_sets`` distinct sets exist (tiny models), only that many are drawn instead of looping
    forever.

    Returns:
        A list of sorted ``(size,)`` int64 tensors.
    """
    n_sets = min(n_sets, comb(scores.numel(), size))
    weights = scores.double().sigmoid()
    sets: list[torch.Tensor] = []
    while len(sets) < n_sets:
        draw = torch.sort(torch.multinomial(weights, size, replacement=False, generator=generator)).values
        if not any(torch.equal(draw, s) for s in sets):
            sets.append(draw)
    return sets


def ist_score_update(
    scores: torch.Tensor, sets: list[torch.Tensor], losses: list[float], lr: float = 10.0
) -> torch.Tensor:
    """IST's REINFORCE-style update of the layer scores after a probe.

    ``R_k = exp(−ℓ_k)``, ``A_k = R_k − mean(R)``, ``p = sigmoid(s)`` taken once before the
    loop; for each set k and each layer i in it: ``s_i += lr · A_k · p_i (1 − p_i)``.

    Args:
        scores: ``(L,)`` current scores (not modified).
        sets: the probed layer sets; losses: the loss ``ℓ_k`` measured with set k suppressed.

    Returns:
        ``(L,)`` updated scores (same dtype as ``scores``).
    """
    if len(sets) != len(losses):
        raise ValueError(f"{len(sets)} probe sets but {len(losses)} losses")
    rewards = torch.exp(-torch.tensor(losses, dtype=torch.float64))
    advantages = rewards - rewards.mean()
    p = scores.double().sigmoid()
    new = scores.double().clone()
    for layer_set, advantage in zip(sets, advantages):
        for i in layer_set.tolist():
            new[i] += lr * advantage * p[i] * (1 - p[i])
    return new.to(scores.dtype)


def fisher_layer_scores(fisher: list[list[torch.Tensor]]) -> torch.Tensor:
    """Surgical fine-tuning's layer score: the sum of the Frobenius norms of a layer's
    diagonal-Fisher tensors (mean squared per-example gradients).

    Args:
        fisher: ``fisher[l]`` lists the Fisher tensors of layer ``l``'s parameters.

    Returns:
        ``(L,)`` float64 scores (0 for a layer without trainable tensors).
    """
    return torch.tensor(
        [sum(float(torch.linalg.vector_norm(f.double())) for f in layer) for layer in fisher],
        dtype=torch.float64,
    )


def top_layers(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` highest-scoring layers (ties broken by lower index). Sorted int64."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    return torch.sort(order[:count]).values


def column_mask(n_samples: int, n_layers: int, active: torch.Tensor) -> torch.Tensor:
    """``(N, L)`` bool mask of a layer-selective method: whole columns of the active layers."""
    mask = torch.zeros(n_samples, n_layers, dtype=torch.bool)
    mask[:, active.long()] = True
    return mask


def row_mask(n_samples: int, n_layers: int, rows: torch.Tensor) -> torch.Tensor:
    """``(N, L)`` bool mask of a data-selective method: whole rows of the kept samples."""
    mask = torch.zeros(n_samples, n_layers, dtype=torch.bool)
    mask[rows.long(), :] = True
    return mask

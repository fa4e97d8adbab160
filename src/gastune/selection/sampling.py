"""Pure selection functions: scores in, chosen sample indices out.

Shapes: ``N`` samples in a (micro-)batch, ``K`` samples kept per layer.
All functions are deterministic given their ``generator``.
"""

from __future__ import annotations

from typing import Literal

import torch

SelectionMode = Literal["softmax", "random", "topk"]
SELECTION_MODES: tuple[str, ...] = ("softmax", "random", "topk")


def standardize(scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(a - mean) / (std + eps · max|a|) over the batch; all-equal scores map to zeros.

    ``eps`` is relative to the scores' own scale, so the result does not depend on it:
    alignment scores carry the loss's 1/N and 1/gradient-accumulation factors and the size of
    the adapter weights, and an absolute ε would flatten small ones towards uniform.
    ``standardize(c * a) == standardize(a)`` for every c > 0.

    Args:
        scores: ``(N,)`` alignment scores of one layer.

    Example:
        >>> a = torch.tensor([1.0, 2.0, 4.0])
        >>> torch.allclose(standardize(a * 1e-12), standardize(a))
        True
    """
    scores = scores.double()
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    centred = scores - scores.mean()
    denominator = scores.std(unbiased=False) + eps * scores.abs().max()
    if denominator == 0:  # every score is 0
        return torch.zeros_like(scores)
    return centred / denominator


def selection_probs(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(standardize(scores) / temperature), with invalid samples given probability 0.

    Non-finite scores (a NaN/inf loss or gradient) are excluded before standardising.
    Returns ``(N,)`` float64 probabilities.
    """
    valid = torch.isfinite(scores)
    probs = torch.zeros(scores.shape, dtype=torch.float64, device=scores.device)
    if not valid.any():
        return probs
    z = standardize(scores[valid]) / temperature
    probs[valid] = torch.softmax(z, dim=0)
    return probs


def choose_samples(
    scores: torch.Tensor,
    k: int,
    mode: SelectionMode = "softmax",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick ``k`` distinct sample indices for one layer.

    - ``softmax``: draw without replacement with p = softmax(standardized score / τ) (GAST).
    - ``random``: uniform draw without replacement (the paper's ablation).
    - ``topk``: the k best-aligned samples (the paper's ablation; ties broken by index).

    Samples with a non-finite score are never chosen; if fewer than ``k`` are finite, all
    finite ones are returned. Returns a sorted ``(k',)`` int64 tensor on the CPU.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> choose_samples(torch.tensor([0.1, 2.0, -1.0, 0.5]), 2, generator=g).tolist()  # doctest: +SKIP
        [1, 3]
    """
    scores = scores.detach().cpu()
    valid = torch.isfinite(scores)
    n_valid = int(valid.sum())
    k = min(k, n_valid)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    if mode == "topk":
        masked = torch.where(valid, scores.double(), torch.tensor(float("-inf"), dtype=torch.float64))
        # stable sort so that ties are broken by index, making the choice reproducible
        order = torch.sort(masked, descending=True, stable=True).indices
        chosen = order[:k]
    elif mode == "softmax":
        chosen = torch.multinomial(
            selection_probs(scores, temperature), k, replacement=False, generator=generator
        )
    elif mode == "random":
        chosen = torch.multinomial(valid.double(), k, replacement=False, generator=generator)
    else:
        raise ValueError(f"unknown selection mode '{mode}'; choose one of {SELECTION_MODES}")
    return torch.sort(chosen).values


def alignment_scores(
    per_sample: list[torch.Tensor], support: list[torch.Tensor], score: str = "dot"
) -> torch.Tensor:
    """Alignment of each sample's gradient with the support gradient, summed over tensors.

    Args:
        per_sample: tensors of shape ``(N, *shape_j)``: per-sample gradients of one layer.
        support: matching tensors of shape ``shape_j``: the layer's support gradient.
        score: ``dot`` (raw inner product, the paper) or ``cosine``.

    Returns:
        ``(N,)`` float64 scores.
    """
    if score not in ("dot", "cosine"):
        raise ValueError(f"unknown score '{score}'; choose 'dot' or 'cosine'")
    n = per_sample[0].shape[0]
    dot = torch.zeros(n, dtype=torch.float64, device=per_sample[0].device)
    sq = torch.zeros(n, dtype=torch.float64, device=per_sample[0].device)
    support_sq = torch.zeros((), dtype=torch.float64, device=per_sample[0].device)
    for g, s in zip(per_sample, support, strict=True):
        # fp32 matmul per tensor (no float64 copy of N × |θ_l| values), float64 across tensors
        g = g.reshape(n, -1).float()
        s = s.reshape(-1).float().to(g.device)
        dot += (g @ s).double()
        if score == "cosine":
            sq += (g * g).sum(dim=1).double()
            support_sq += (s * s).sum().double()
    if score == "dot":
        return dot
    return dot / (sq.sqrt() * support_sq.sqrt()).clamp_min(1e-30)


def support_is_usable(support: list[torch.Tensor]) -> bool:
    """Whether a group's support gradient can rank samples: finite and not all zero.

    A zero support scores every sample 0 (a uniform draw that looks like a choice); a
    non-finite one scores every sample NaN.
    """
    finite = all(bool(torch.isfinite(s).all()) for s in support)
    return finite and any(bool(s.ne(0).any()) for s in support)


def batch_support(per_sample: list[torch.Tensor]) -> list[torch.Tensor]:
    """The batch's own mean per-sample gradient over the samples whose gradient is finite
    (the ``support=batch`` direction; zeros if no sample is finite).

    Args:
        per_sample: tensors of shape ``(N, *shape_j)``.
    """
    n = per_sample[0].shape[0]
    finite = torch.ones(n, dtype=torch.bool, device=per_sample[0].device)
    for g in per_sample:
        finite &= torch.isfinite(g.reshape(n, -1)).all(dim=1)
    if bool(finite.all()):  # the usual case: no (N, ...) copy
        return [g.mean(dim=0) for g in per_sample]
    if not finite.any():
        return [torch.zeros_like(g[0]) for g in per_sample]
    return [g[finite].mean(dim=0) for g in per_sample]


def mask_ineligible(
    scores: torch.Tensor, per_sample: list[torch.Tensor], eligible: torch.Tensor | None = None
) -> torch.Tensor:
    """``scores`` with NaN (never chosen) for samples that must not be selected: those
    ``eligible`` marks False, and those whose gradient is exactly zero in every tensor — a
    sample with no target token has loss 0 and no gradient, and would take a slot while
    adding nothing but a smaller mean.

    Args:
        scores: ``(N,)``; per_sample: tensors ``(N, *shape_j)``; eligible: ``(N,)`` bool or None.
    """
    n = scores.shape[0]
    signal = torch.zeros(n, dtype=torch.bool, device=scores.device)
    for g in per_sample:
        # inf-norm: a reduction, no (N, numel) temporary; NaN rows stay "signal" (NaN scores)
        norm = torch.linalg.vector_norm(g.reshape(n, -1).float(), ord=float("inf"), dim=1)
        signal |= (norm != 0).to(signal.device)
    keep = signal if eligible is None else signal & eligible.to(device=signal.device, dtype=torch.bool)
    if bool(keep.all()):
        return scores
    return torch.where(keep, scores, torch.full_like(scores, float("nan")))


def layer_seed(step_seed: int, layer: int) -> int:
    """A per-layer seed derived from the step's seed, so the draw of one layer does not
    depend on the order in which layers are processed (backward visits them last-first)."""
    return (step_seed * 1_000_003 + layer * 7919 + 17) % (2**63 - 1)


def layer_generator(step_seed: int, layer: int) -> torch.Generator:
    return torch.Generator().manual_seed(layer_seed(step_seed, layer))

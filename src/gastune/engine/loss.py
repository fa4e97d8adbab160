"""Per-sample causal-LM loss: each sample's mean token loss (the unit GAST selects on)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample over its target tokens.

    Args:
        logits: ``(N, T, V)``; labels: ``(N, T)`` with -100 where there is no target.

    Returns:
        ``(N,)`` losses. A sample with no target token gets loss 0 (and zero gradient).
    """
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    n, t, v = shift_logits.shape
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, v).float(), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(n, t)
    counts = (shift_labels != -100).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp_min(1)


def has_target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: the sample has at least one target token after the causal shift, i.e.
    ``per_sample_loss`` scores it. Pass it as ``GastEngine.step(eligible=...)``.

    Example:
        >>> has_target_tokens(torch.tensor([[5, 6, 7], [5, -100, -100]])).tolist()
        [True, False]
    """
    return (labels[:, 1:] != -100).any(dim=1)

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

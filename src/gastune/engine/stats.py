"""Selection statistics: what was chosen in a step, for logs and the heatmap."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gastune.selection.sampling import standardize


@dataclass
class SelectionRecord:
    """One group's choice in one micro-batch."""

    group: int
    chosen: list[int]
    scores: list[float]
    # the support gradient was zero or non-finite, so the batch's own mean gradient was used
    support_fallback: bool = False

    @classmethod
    def from_scores(
        cls, group: int, scores: torch.Tensor, chosen: torch.Tensor, support_fallback: bool = False
    ) -> SelectionRecord:
        return cls(
            group=group,
            chosen=chosen.tolist(),
            scores=scores.double().cpu().tolist(),
            support_fallback=support_fallback,
        )


def selection_mask(records: list[SelectionRecord], batch_size: int, n_groups: int) -> torch.Tensor:
    """``(N, n_groups)`` bool mask: sample i updated group l."""
    mask = torch.zeros(batch_size, n_groups, dtype=torch.bool)
    for r in records:
        mask[r.chosen, r.group] = True
    return mask


def summarize(records: list[SelectionRecord], batch_size: int, n_groups: int) -> dict[str, float]:
    """Scalars for the Trainer's log.

    - ``alignment_chosen`` / ``alignment_all``: mean standardised score of chosen vs all samples;
    - ``negative_pick_frac``: share of picks whose raw alignment with the support is < 0;
    - ``usage_cv``: coefficient of variation of how many groups each sample updated
      (0 = every sample used equally often across layers);
    - ``unused_frac``: share of samples that updated no group at all;
    - ``support_fallback_frac``: share of groups whose support gradient was zero or
      non-finite and that ranked by the batch's own mean gradient instead.
    """
    if not records:
        return {}
    z_chosen, z_all, negative, picks = [], [], 0, 0
    for r in records:
        s = torch.tensor(r.scores, dtype=torch.float64)
        finite = torch.isfinite(s)
        if finite.sum() < 1:
            continue
        z = torch.zeros_like(s)
        z[finite] = standardize(s[finite])  # the same scale-free z the selection used
        z_all.append(z[finite].mean().item())
        if r.chosen:
            z_chosen.append(z[r.chosen].mean().item())
            negative += int((s[r.chosen] < 0).sum())
            picks += len(r.chosen)
    usage = selection_mask(records, batch_size, n_groups).sum(dim=1).double()
    mean_usage = usage.mean().item()
    return {
        "alignment_chosen": sum(z_chosen) / max(len(z_chosen), 1),
        "alignment_all": sum(z_all) / max(len(z_all), 1),
        "negative_pick_frac": negative / max(picks, 1),
        "usage_cv": (usage.std(unbiased=False).item() / mean_usage) if mean_usage > 0 else 0.0,
        "unused_frac": (usage == 0).double().mean().item(),
        "support_fallback_frac": sum(r.support_fallback for r in records) / len(records),
    }

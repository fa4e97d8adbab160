"""Numerical safety of a training step: samples that cannot train are taken out of it.

Two kinds of sample are removed from a micro-batch before its update, for every method:

- **no target token** (all labels -100 after the causal shift, e.g. a prompt that filled
  the whole ``cutoff_len``): its loss is 0 and its gradient exactly zero, so under GAST
  its alignment score is 0 and it could be drawn ahead of real samples with negative
  scores, diluting the layer's mean. Removed before the step (unless every row is such).
- **non-finite loss** (NaN/inf, e.g. an overflow or a corrupt input): one such sample makes
  the batch-mean loss NaN, and since ``0 × NaN = NaN`` no masking of the loss can keep its
  NaN activations out of the weight gradients summed over the batch (an ``lm_head`` in
  ``modules_to_save``, the embeddings, or every adapter under dense LoRA). So the loss is
  checked in the forward; if a row is non-finite the micro-batch is run again without it
  (before any backward, so nothing has been accumulated yet). A dropped sample therefore
  gets a zero gradient for *every* parameter and is never selected by any method. If every
  row is non-finite the micro-batch is skipped (a zero-gradient backward, which keeps data
  parallel ranks in step).

Both are counted in the training logs (``numerics/no_target_samples``,
``numerics/nonfinite_samples``) and logged as warnings.

A sample whose loss is finite but whose per-sample *gradient* is not (an overflow in the
backward pass only) is caught later: GAST never selects it (its alignment score is
non-finite) and it is counted in ``numerics/nonfinite_grad_samples``; but parameters
outside the decoder blocks receive the batch sum of gradients, which cannot be split by
sample after the fact, so they are protected only against non-finite *losses*.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from gastune.engine.loss import has_target_tokens
from gastune.engine.stats import SelectionRecord

logger = logging.getLogger(__name__)


class NonFiniteLoss(Exception):
    """Raised inside a training forward when some samples' losses are NaN/inf.

    Carries the offending rows themselves (``index`` values when the batch has them, else
    ``input_ids`` rows), not their positions: a method may have run the forward on a subset
    of the micro-batch (the data-selection baselines do).
    """

    def __init__(self, inputs: dict[str, Any], bad: torch.Tensor):
        rows = bad.nonzero().flatten()
        super().__init__(f"non-finite loss in {len(rows)} rows")
        index = inputs.get("index")
        self.index = index[rows.to(index.device)] if _is_row_tensor(index, bad) else None
        self.input_ids = inputs["input_ids"][rows.to(inputs["input_ids"].device)]

    def rows_in(self, inputs: dict[str, Any]) -> torch.Tensor:
        """``(N,)`` bool: the rows of ``inputs`` that are the offending samples."""
        index = inputs.get("index")
        if self.index is not None and isinstance(index, torch.Tensor):
            return torch.isin(index.cpu(), self.index.cpu())
        ids = inputs["input_ids"].cpu()
        bad = self.input_ids.cpu()
        if ids.shape[1:] != bad.shape[1:]:
            raise RuntimeError("gastune: cannot match the rows with a non-finite loss to the batch")
        return (ids[:, None, :] == bad[None, :, :]).all(dim=2).any(dim=1)


# ``(N,)`` bool: the sample has at least one target token after the causal shift (the engine's
# ``eligible`` test, kept under this name for the trainer side)
has_targets = has_target_tokens


def take_rows(inputs: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """The micro-batch restricted to the rows where ``keep`` (``(N,)`` bool) is True.

    Tensors and lists whose first dimension is the batch are cut; anything else is kept.
    """
    n = keep.numel()
    rows = keep.nonzero().flatten()
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value.index_select(0, rows.to(value.device))
        elif isinstance(value, list) and len(value) == n:
            out[key] = [value[i] for i in rows.tolist()]
        else:
            out[key] = value
    return out


def nonfinite_score_rows(records: list[SelectionRecord], n: int) -> torch.Tensor:
    """``(N,)`` bool: the sample had a non-finite alignment score in some selection group."""
    bad = torch.zeros(n, dtype=torch.bool)
    for record in records:
        scores = torch.tensor(record.scores, dtype=torch.float64)
        if scores.numel() == n:
            bad |= ~torch.isfinite(scores)
    return bad


def zero_gradient_loss(model: torch.nn.Module) -> torch.Tensor:
    """A loss whose backward gives every trainable parameter an exactly-zero gradient (even
    a non-finite parameter: the gradient of ``0 · Σp`` is the constant 0)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return sum(p.sum() * 0.0 for p in params)


class SampleGuard:
    """Counts what the trainer removed; ``metrics()`` reports and resets the counts."""

    def __init__(self):
        self.active = False  # True inside a training step: only then may the loss raise
        self._counts = {"no_target_samples": 0, "nonfinite_samples": 0, "nonfinite_grad_samples": 0}

    def drop_no_target(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Remove rows without a target token (kept if every row is such: nothing to prefer)."""
        keep = has_targets(inputs["labels"])
        if keep.all() or not keep.any():
            return inputs
        dropped = int((~keep).sum())
        self._counts["no_target_samples"] += dropped
        logger.warning(
            "skipped %d of %d samples with no target token%s",
            dropped,
            keep.numel(),
            _where(inputs, ~keep),
        )
        return take_rows(inputs, keep)

    def drop_nonfinite(self, inputs: dict[str, Any], error: NonFiniteLoss) -> dict[str, Any] | None:
        """Remove the rows ``error`` names; None if none are left."""
        n = inputs["input_ids"].shape[0]
        bad = error.rows_in(inputs)
        if not bad.any():  # should not happen: failing loudly beats re-running forever
            raise RuntimeError("gastune: the rows with a non-finite loss are not in the micro-batch")
        self._counts["nonfinite_samples"] += int(bad.sum())
        logger.warning(
            "dropped %d of %d samples with a non-finite loss from the step%s",
            int(bad.sum()),
            n,
            _where(inputs, bad),
        )
        return None if bad.all() else take_rows(inputs, ~bad)

    def check_scores(self, records: list[SelectionRecord], n: int) -> None:
        """Count samples that GAST could not score (a non-finite per-sample gradient)."""
        bad = nonfinite_score_rows(records, n)
        if not bad.any():
            return
        self._counts["nonfinite_grad_samples"] += int(bad.sum())
        what = "the support gradient is non-finite" if bad.all() else "their gradient is non-finite"
        logger.warning("%d of %d samples could not be selected in some layer: %s", int(bad.sum()), n, what)

    def metrics(self) -> dict[str, float]:
        out = {f"numerics/{k}": float(v) for k, v in self._counts.items()}
        self._counts = dict.fromkeys(self._counts, 0)
        return out


def _is_row_tensor(value: Any, rows: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows.shape[0]


def _where(inputs: dict[str, Any], rows: torch.Tensor) -> str:
    index = inputs.get("index")
    if _is_row_tensor(index, rows):
        return f" (dataset rows {index[rows.to(index.device)].tolist()})"
    return ""

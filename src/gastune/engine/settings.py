"""GAST hyper-parameters, checked where they are defined."""

from __future__ import annotations

from dataclasses import dataclass

from gastune.errors import GastuneError
from gastune.selection.sampling import SELECTION_MODES


@dataclass(frozen=True)
class GastSettings:
    """How GAST scores and selects samples per layer.

    Attributes:
        k: samples kept per layer: an int ≥ 1 is a count, a float in (0, 1) a fraction of
            the micro-batch (rounded, at least 1). Paper: 8 of 16.
        selection: ``softmax`` (GAST), ``random`` or ``topk`` (the paper's ablations).
        score: ``dot`` (raw inner product, the paper) or ``cosine``.
        temperature: τ of the softmax over standardised scores.
        granularity: ``block`` (one choice per decoder block) or ``module`` (one per adapted
            module, e.g. q_proj of block 3).
    """

    k: float = 0.5
    selection: str = "softmax"
    score: str = "dot"
    temperature: float = 1.0
    granularity: str = "block"

    def __post_init__(self) -> None:
        if self.k <= 0 or (not float(self.k).is_integer() and self.k >= 1):
            raise GastuneError(f"gast k must be a count ≥ 1 or a fraction in (0, 1), got {self.k}")
        if self.selection not in SELECTION_MODES:
            raise GastuneError(
                f"unknown selection '{self.selection}'; choose one of {', '.join(SELECTION_MODES)}"
            )
        if self.score not in ("dot", "cosine"):
            raise GastuneError(f"unknown score '{self.score}'; choose dot or cosine")
        if not self.temperature > 0:
            raise GastuneError(f"temperature τ must be > 0, got {self.temperature}")
        if self.granularity not in ("block", "module"):
            raise GastuneError(f"unknown granularity '{self.granularity}'; choose block or module")

    def k_for(self, batch_size: int, full_batch_size: int | None = None) -> int:
        """The number of samples kept per layer in a micro-batch of ``batch_size``.

        A count k is given for full micro-batches of ``full_batch_size``; a shorter one (the
        last of an epoch) keeps the same fraction, so training does not stop at epoch end.
        """
        if self.k < 1:
            return max(1, round(self.k * batch_size))
        k = int(self.k)
        full = full_batch_size or batch_size
        if k > full:
            raise GastuneError(f"gast k={k} exceeds the micro-batch size {full}")
        if batch_size < full:
            k = max(1, min(k, round(k * batch_size / full)))
        return k

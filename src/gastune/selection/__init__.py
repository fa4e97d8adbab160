"""Selection policies as pure functions over scores (no models, no autograd)."""

from gastune.selection.sampling import (
    SELECTION_MODES,
    alignment_scores,
    choose_samples,
    layer_generator,
    selection_probs,
    standardize,
)

__all__ = [
    "SELECTION_MODES",
    "alignment_scores",
    "choose_samples",
    "layer_generator",
    "selection_probs",
    "standardize",
]

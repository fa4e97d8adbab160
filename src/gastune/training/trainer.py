"""Trainer integration: a mixin that works with transformers' Trainer and trl's SFTTrainer.

The mixin changes two things: the loss is the mean over samples of each sample's mean token
loss (the unit every method selects on, identical for all methods so comparisons are fair),
and each training step is delegated to the chosen method, which may wrap the ordinary
forward + backward (GAST arms its engine around it).

Example:
    >>> trainer = GastuneTrainer(model=peft_model, args=GastuneConfig(method="gast"),  # doctest: +SKIP
    ...                          train_dataset=ds, data_collator=collator)
    >>> trainer.train()  # doctest: +SKIP

With trl: ``class GastSFTTrainer(GastuneMixin, SFTTrainer): pass`` and pass
``method=GastMethod(...)`` (an SFTConfig has no GAST fields).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from gastune.engine.loss import per_sample_loss
from gastune.training.methods import TrainingMethod, build_method

# Collator keys that are bookkeeping, not model inputs.
NON_MODEL_KEYS = ("labels", "index", "completion_mask", "assistant_masks")


class GastuneMixin:
    """Mix into any ``transformers.Trainer`` subclass (put it first in the bases)."""

    def __init__(self, *args, method: TrainingMethod | None = None, support_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        # Our loss is a per-sample mean: let the Trainer divide it by gradient accumulation.
        self.loss_is_scaled_for_ga = False
        self.method = (
            method if method is not None else build_method(self.args, support_dataset=support_dataset)
        )
        self._method_ready = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        outputs = model(**model_inputs)
        loss = per_sample_loss(outputs.logits, labels).mean()
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        if not self._method_ready:
            self.method.setup(self, model)
            self._method_ready = True

        def run() -> torch.Tensor:
            return super(GastuneMixin, self).training_step(model, inputs, num_items_in_batch)

        return self.method.training_step(self, model, inputs, run)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: add what the method measured since the last one
            logs = {**logs, **self.method.metrics()}
        super().log(logs, *args, **kwargs)


class GastuneTrainer(GastuneMixin, Trainer):
    """``transformers.Trainer`` training with the method in ``args.method``."""

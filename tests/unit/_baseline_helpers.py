"""Shared set-up of the baseline tests: tiny LoRA models, row datasets, SGD configs."""

from __future__ import annotations

import re

import torch

from gastune.training import GastuneTrainer
from tests import helpers
from tests.helpers import LR, trainable  # noqa: F401  (re-exported for the baseline tests)
from tests.helpers import RecordingCollator as Collator
from tests.helpers import row_dataset as dataset
from tests.helpers import sgd_config as config

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def lora_model(layers: int = 4, tuner: str = "lora") -> torch.nn.Module:
    return helpers.lora_model(layers=layers, tuner=tuner)


def trainer_for(method: str, model=None, data=None, collator=None, callbacks=None, **overrides):
    return GastuneTrainer(
        model=model if model is not None else lora_model(),
        args=config(method=method, **overrides),
        train_dataset=data if data is not None else dataset(),
        data_collator=collator or Collator(),
        callbacks=callbacks,
    )


def layer_of(name: str) -> int:
    return int(_LAYER.search(name).group(1))


def loss_grads(model, batch, rows=None) -> dict[str, torch.Tensor]:
    """∇ of the mean (over ``rows``, default all) of per-sample losses, per trainable name."""
    from gastune.engine import per_sample_loss

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    losses = per_sample_loss(out.logits, batch["labels"])
    if rows is not None:
        losses = losses[rows]
    grads = torch.autograd.grad(losses.mean(), [p for _, p in named], allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(named, grads)}

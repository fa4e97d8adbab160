"""Slow, obviously-correct GAST step: per-sample gradients one sample at a time.

Only for tests and sanity checks — it runs N+1 separate backward passes.
"""

from __future__ import annotations

import torch
from torch import nn

from gastune.engine.checkpointing import non_reentrant_checkpointing
from gastune.engine.loss import per_sample_loss
from gastune.engine.settings import GastSettings
from gastune.models.blocks import find_decoder_blocks, trainable_by_block
from gastune.selection.sampling import (
    alignment_scores,
    batch_support,
    choose_samples,
    layer_generator,
    mask_ineligible,
    support_is_usable,
)


def _grads(
    model: nn.Module, batch: dict[str, torch.Tensor], params: list[nn.Parameter]
) -> list[torch.Tensor]:
    with non_reentrant_checkpointing(model):  # reentrant checkpointing hides params from .grad()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = per_sample_loss(out.logits, batch["labels"]).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def reference_gast_gradients(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    settings: GastSettings,
    support_batch: dict[str, torch.Tensor] | None,
    step_seed: int,
    groups: list[list[nn.Parameter]] | None = None,
    eligible: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """The GAST gradient of every trainable parameter, keyed by ``id(param)``.

    ``groups`` lists the selection groups in the engine's order (default: one per block).
    Parameters outside blocks get the plain batch mean. ``eligible`` is ``GastEngine.step``'s.
    """
    per_block, outside = trainable_by_block(model, find_decoder_blocks(model))
    groups = groups or [[p for _, p in named] for named in per_block if named]
    n = batch["input_ids"].shape[0]
    rows = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(n)]
    result: dict[int, torch.Tensor] = {}
    for index, params in enumerate(groups):
        per_sample = [torch.stack(tensors) for tensors in zip(*[_grads(model, row, params) for row in rows])]
        if support_batch is None:
            support = batch_support(per_sample)
        else:
            support = _grads(model, support_batch, params)
            if not support_is_usable(support):  # zero or non-finite: the batch's own direction
                support = batch_support(per_sample)
        # a sample with no gradient (no target token) or not eligible is never selected
        scores = mask_ineligible(alignment_scores(per_sample, support, settings.score), per_sample, eligible)
        chosen = choose_samples(
            scores,
            settings.k_for(n),
            settings.selection,
            settings.temperature,
            layer_generator(step_seed, index),
        )
        for p, g in zip(params, per_sample):
            result[id(p)] = g[chosen].mean(dim=0) if len(chosen) else torch.zeros_like(p)
    outside_params = [p for _, p in outside]
    if outside_params:
        for p, g in zip(outside_params, _grads(model, batch, outside_params)):
            result[id(p)] = g
    return result

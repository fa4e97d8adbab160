"""Support gradients: the per-block reference direction GAST aligns samples with."""

from __future__ import annotations

import torch
from torch import nn

from gastune.engine.loss import per_sample_loss


def support_gradients(
    model: nn.Module, batch: dict[str, torch.Tensor], block_parameters: list[list[nn.Parameter]]
) -> dict[int, torch.Tensor]:
    """G_l = ∇_{θ_l} mean_s ℓ(s) for every block parameter, keyed by ``id(param)``.

    Uses ``torch.autograd.grad`` so nothing is accumulated into ``.grad`` (important under
    gradient accumulation) and no data-parallel reduction is triggered: each rank keeps its
    own support gradient. Run it with the engine disarmed.
    """
    # Parameters a layer-selective method froze for this step are left out (no entry), so
    # back-propagation stops below the lowest trainable block.
    params = [p for block in block_parameters for p in block if p.requires_grad]
    if not params:
        return {}
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    loss = per_sample_loss(outputs.logits, batch["labels"]).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {id(p): (torch.zeros_like(p) if g is None else g.detach()) for p, g in zip(params, grads)}

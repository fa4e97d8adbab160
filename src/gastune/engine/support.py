"""Support gradients: the per-block reference direction GAST aligns samples with."""

from __future__ import annotations

import logging

import torch
from torch import nn

from gastune.engine.checkpointing import non_reentrant_checkpointing
from gastune.engine.fused_loss import model_per_sample_loss
from gastune.engine.live import full_shape, parameters_in_use
from gastune.errors import GastuneError

logger = logging.getLogger(__name__)

# The micro-batch key that tells the loss how many rows at its end are one-pass support rows.
SUPPORT_ROWS_KEY = "gast_support_rows"


def support_gradients(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    block_parameters: list[list[nn.Parameter]],
    blocks: list[nn.Module] | None = None,
) -> dict[int, torch.Tensor]:
    """G_l = ∇_{θ_l} mean_s ℓ(s) for every block parameter, keyed by ``id(param)``.

    Uses ``torch.autograd.grad`` so nothing is accumulated into ``.grad`` (important under
    gradient accumulation) and no data-parallel reduction is triggered: each rank keeps its
    own support gradient (under FSDP2 nothing reaches ``.grad``, so nothing is
    reduce-scattered either). Run it with the engine disarmed.

    ``blocks`` (the decoder blocks ``block_parameters`` belong to) makes it work under FSDP2:
    the gradient is then taken with respect to the tensors each block's forward really used
    (``gastune.engine.live``), whole on every rank.
    """
    # Parameters a layer-selective method froze for this step are left out (no entry), so
    # back-propagation stops below the lowest trainable block.
    params = [p for block in block_parameters for p in block if p.requires_grad]
    if not params:
        return {}
    # Reentrant checkpointing would hide the parameters from autograd.grad: see checkpointing.py.
    with non_reentrant_checkpointing(model):
        return _support_gradients(model, batch, block_parameters, blocks, params)


def _support_gradients(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    block_parameters: list[list[nn.Parameter]],
    blocks: list[nn.Module] | None,
    params: list[nn.Parameter],
) -> dict[int, torch.Tensor]:
    with parameters_in_use(blocks or [], block_parameters) as in_use:
        losses = _support_losses(model, batch)
    # A support sample with a NaN/inf loss would make every block's support gradient NaN (and
    # with it every score). Masking its loss is not enough — its inf activations meet a zero
    # gradient in the batch-summed weight gradients (0 × inf = NaN) — so the forward is run
    # again on the finite rows only. This costs nothing unless it happens.
    finite = torch.isfinite(losses.detach())
    if not finite.all():
        if not finite.any():
            logger.warning("every support sample has a non-finite loss; this step's support gradient is zero")
            return {id(p): _zeros(in_use.get(id(p), p)) for p in params}
        logger.warning("dropped %d support sample(s) with a non-finite loss", int((~finite).sum()))
        rows = finite.nonzero().flatten()
        batch = {
            k: v.index_select(0, rows.to(v.device)) if torch.is_tensor(v) else v for k, v in batch.items()
        }
        with parameters_in_use(blocks or [], block_parameters) as in_use:
            losses = _support_losses(model, batch)
    used = [in_use.get(id(p), p) for p in params]
    grads = torch.autograd.grad(losses.mean(), used, allow_unused=True)
    if all(g is None for g in grads):
        raise GastuneError(
            "the support pass reached none of the adapter parameters (activation checkpointing that "
            'hides them from autograd?); use gradient_checkpointing_kwargs {"use_reentrant": false}'
        )
    return {id(p): (_zeros(u) if g is None else g.detach()) for p, u, g in zip(params, used, grads)}


def _zeros(t: torch.Tensor) -> torch.Tensor:
    """Zeros of ``t``'s whole shape (under ZeRO-3, ``t`` is partitioned again after the pass)."""
    return torch.zeros(full_shape(t), dtype=t.dtype, device=t.device)


def _support_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    return model_per_sample_loss(model, inputs, batch["labels"])[0]


def support_sum(per_sample: torch.Tensor) -> torch.Tensor:
    """One-pass support: the sum of the support rows' per-sample gradients ``(K_sup, …)``.

    A row with a non-finite gradient (its loss overflowed) is left out, as the two-pass
    ``support_gradients`` leaves out a row with a non-finite loss; with no host sync.
    """
    finite = torch.isfinite(per_sample.reshape(per_sample.shape[0], -1)).all(dim=1)
    finite = finite.view(-1, *([1] * (per_sample.dim() - 1)))
    return torch.where(finite, per_sample, 0.0).sum(dim=0)


def one_pass_loss(losses: torch.Tensor, support_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of a forward over training rows followed by ``support_rows`` support rows.

    Returns ``(loss, training_losses)``: ``loss`` has the value of the training rows' mean
    (what the step reports) and the gradient of the training rows' mean plus the support
    rows' mean, so each support row's per-sample gradient carries 1/K_sup and their sum at a
    block gate is the support gradient G_l. A support row with a non-finite loss gets weight 0.
    """
    n = losses.shape[0] - support_rows
    train, support = losses[:n], losses[n:]
    support = torch.where(torch.isfinite(support.detach()), support, 0.0).mean()
    return train.mean() + (support - support.detach()), train

"""Per-sample gradient inner products of all block adapter parameters, in one scoring pass.

Reuses the GAST engine in its score-only mode: during one forward + backward of the batch
each block's per-sample gradients ``g_{i,l}`` (formed from the block's layer inputs and
output gradients) are reduced at once to ``(N, N)`` inner products and dot products with
reference gradients, then freed — so the pass costs about one LoRA step plus the per-sample
products, and never holds more than one block's per-sample gradients.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from gastune.engine import GastEngine
from gastune.engine.checkpointing import non_reentrant_checkpointing
from gastune.engine.live import parameters_in_use
from gastune.engine.loss import per_sample_loss


@dataclass
class SampleScores:
    """What one scoring pass measured over a batch of N samples (all float64, on the CPU).

    Attributes:
        losses: ``(N,)`` per-sample losses.
        sq_norms: ``(N,)`` ‖g_i‖² over all block adapter tensors.
        gram: ``(N, N)`` ⟨g_i, g_j⟩, or None when not asked for.
        ref_dots: ``(N,)`` ⟨g_i, g_ref⟩, or None without a reference gradient.
    """

    losses: torch.Tensor
    sq_norms: torch.Tensor
    gram: torch.Tensor | None = None
    ref_dots: torch.Tensor | None = None


class PerSampleGradients:
    """Attach to a (peft) model; ``score(batch)`` gives per-sample gradient statistics."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.engine = GastEngine(model).attach()

    @property
    def block_parameters(self) -> list[list[nn.Parameter]]:
        return self.engine.block_parameters

    def score(
        self,
        batch: dict[str, torch.Tensor],
        gram: bool = False,
        reference: dict[int, torch.Tensor] | None = None,
        context: AbstractContextManager | None = None,
    ) -> SampleScores:
        """One forward + backward of ``batch``; ``.grad`` is left untouched.

        Args:
            gram: also compute the ``(N, N)`` Gram matrix of per-sample gradients.
            reference: a gradient per block parameter, keyed by ``id(param)`` (e.g. the
                validation gradient from ``support_gradients``).
            context: e.g. the Trainer's autocast context for the forward.
        """
        n = batch["input_ids"].shape[0]
        # Accumulated on the model's device and moved to the host once at the end: a copy to
        # the host inside backward would stall the device at every block.
        device = batch["input_ids"].device
        sq = torch.zeros(n, dtype=torch.float64, device=device)
        full = torch.zeros(n, n, dtype=torch.float64, device=device) if gram else None
        dots = torch.zeros(n, dtype=torch.float64, device=device) if reference is not None else None

        def on_block(index: int, per_sample: list[torch.Tensor]) -> None:
            for p, g in zip(self.engine.block_parameters[index], per_sample):
                flat = g.reshape(n, -1)  # (N, numel) fp32
                sq.add_(flat.square().sum(dim=1).to(sq))
                if full is not None:
                    full.add_((flat @ flat.T).to(full))
                if dots is not None and id(p) in reference:
                    ref = reference[id(p)].reshape(-1).to(device=flat.device, dtype=flat.dtype)
                    dots.add_((flat @ ref).to(dots))

        params = [p for block in self.engine.block_parameters for p in block if p.requires_grad]
        blocks = self.engine.blocks.blocks
        # non-reentrant: reentrant checkpointing would hide the adapters from autograd.grad
        with (
            self.engine.step(n, on_block=on_block),
            torch.enable_grad(),
            non_reentrant_checkpointing(self.model),
        ):
            with context or nullcontext(), parameters_in_use(blocks, self.engine.block_parameters) as in_use:
                out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
                losses = per_sample_loss(out.logits, batch["labels"])
            # The sum, not the mean: the engine then hands over ∇ℓ_i itself, not ∇ℓ_i / N.
            # Under FSDP2 autograd sees the gathered copies of the parameters, not ``params``.
            torch.autograd.grad(losses.sum(), [in_use.get(id(p), p) for p in params], allow_unused=True)
        return SampleScores(
            losses=losses.detach().double().cpu(),
            sq_norms=sq.cpu(),
            gram=None if full is None else full.cpu(),
            ref_dots=None if dots is None else dots.cpu(),
        )

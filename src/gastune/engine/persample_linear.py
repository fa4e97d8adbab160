"""Per-sample weight gradients of ``nn.Linear`` adapters, formed inside back-propagation.

For ``y = x Wᵀ + b`` with per-sample input ``x_i`` (T, d_in) and output gradient
``Δ_i`` (T, d_out), sample i's weight gradient is ``Δ_iᵀ x_i`` — a batched matmul that costs
what the ordinary weight gradient costs. The forward runs on a *detached* weight, so autograd
itself never accumulates the (unselected) batch gradient: the engine's block gate delivers
the selected gradient instead (see ``gate.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from gastune.engine.capture import BlockCapture


class PerSampleLinear(torch.autograd.Function):
    """``F.linear`` whose backward hands per-sample parameter gradients to a capture."""

    @staticmethod
    def forward(ctx, x, weight, bias, capture, weight_param, bias_param):
        # weight/bias arrive detached; *_param are the real Parameters (keys for the capture).
        ctx.save_for_backward(x, weight)
        ctx.capture = capture
        ctx.weight_param = weight_param
        ctx.bias_param = bias_param
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        n = x.shape[0]
        # (N, T, d_out) and (N, T, d_in), any middle dims folded into T; fp32 for accuracy under bf16.
        d = grad_out.reshape(n, -1, grad_out.shape[-1]).float()
        xi = x.reshape(n, -1, x.shape[-1]).float()
        if ctx.weight_param is not None:
            ctx.capture.add(ctx.weight_param, torch.bmm(d.transpose(1, 2), xi))  # (N, d_out, d_in)
        if ctx.bias_param is not None:
            ctx.capture.add(ctx.bias_param, d.sum(dim=1))  # (N, d_out)
        return grad_x, None, None, None, None, None


class _UnattributableLinear(torch.autograd.Function):
    """A linear on a detached weight whose gradient the engine cannot split by sample.

    peft calls adapters on non-batch inputs in a few places (DoRA's weight norm feeds an
    identity matrix through lora_A/lora_B, then detaches the result). If a gradient ever
    reaches such a call, failing loudly beats silently dropping it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        raise RuntimeError(
            "gastune: an adapter Linear was called on an input without the batch as its first "
            "dimension and a gradient reached it; per-sample gradients cannot be attributed"
        )


def per_sample_linear_forward(
    module: torch.nn.Linear, x: torch.Tensor, capture: BlockCapture
) -> torch.Tensor:
    """Forward of an adapter ``nn.Linear`` while the engine is armed."""
    w = module.weight
    b = module.bias
    w_param = w if w.requires_grad else None
    b_param = b if (b is not None and b.requires_grad) else None
    if x.dim() < 2 or x.shape[0] != capture.batch_size:
        return _UnattributableLinear.apply(x, w.detach(), None if b is None else b.detach())
    return PerSampleLinear.apply(x, w.detach(), None if b is None else b.detach(), capture, w_param, b_param)

"""The block gate: where a block's selected gradient enters autograd.

Applied to a block's input hidden states with the block's adapter parameters as extra
inputs, the gate is an identity whose backward runs only after back-propagation has passed
through every use of those parameters inside the block (each use lies on a path from the
block's input to the loss). At that moment the block's per-sample gradients are complete;
the backward returns the masked mean as the parameters' gradient, so it lands in ``.grad``
through the ordinary AccumulateGrad path — DDP/FSDP/DeepSpeed hooks see a normal gradient.
"""

from __future__ import annotations

import torch


class BlockGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, finish, block_index, hidden, *params):
        ctx.finish = finish
        ctx.block_index = block_index
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):
        grads = ctx.finish(ctx.block_index)
        return (None, None, grad_hidden, *grads)

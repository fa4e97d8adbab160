"""Per-step storage of per-sample gradients, one block at a time."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from gastune.engine.live import full_shape


@dataclass
class GenericCall:
    """One armed call of a module owning non-Linear adapter parameters (e.g. DoRA magnitude,
    IA3 vectors, LoHa factors): its inputs, and the gradient reaching its output."""

    forward: object  # the module's original bound forward
    args: tuple
    kwargs: dict
    params: dict[str, nn.Parameter]  # names relative to the module
    grad_out: torch.Tensor | None = None

    def set_grad(self, grad: torch.Tensor) -> None:
        self.grad_out = grad if self.grad_out is None else self.grad_out + grad


@dataclass
class BlockCapture:
    """Per-sample gradients of every adapter parameter, keyed by the Parameter itself.

    Filled by back-propagation through one block, consumed (and freed) by its gate.
    """

    batch_size: int
    grads: dict[int, torch.Tensor] = field(default_factory=dict)
    generic_calls: list[GenericCall] = field(default_factory=list)

    def add(self, param: nn.Parameter, per_sample: torch.Tensor) -> None:
        key = id(param)
        if key in self.grads:
            self.grads[key] = self.grads[key] + per_sample  # the same weight used twice in a block
        else:
            self.grads[key] = per_sample

    def get(self, param: nn.Parameter) -> torch.Tensor:
        """Per-sample gradient ``(N, *param.shape)`` (zeros if the parameter was unused)."""
        g = self.grads.get(id(param))
        if g is None:
            return torch.zeros(
                (self.batch_size, *full_shape(param)), dtype=torch.float32, device=param.device
            )
        return g

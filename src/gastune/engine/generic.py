"""Exact per-sample gradients for adapter parameters that are not ``nn.Linear`` weights.

DoRA's magnitude vector, IA3 scaling vectors, LoHa/LoKr factors… are used in ways that have
no closed-form per-sample gradient we can rely on for every tuner. For those, the engine
records each armed call of the smallest callable module that owns them (its inputs and the
gradient reaching its output) and, when the block's gate runs, replays the call one sample
at a time to get exact per-sample gradients. This costs an extra forward/backward of that
module per step — fine for these small modules, and LoRA's A/B never take this path.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from gastune.engine.capture import BlockCapture, GenericCall

CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList, nn.Sequential)


def call_unit_of(model: nn.Module, param_name: str) -> str:
    """Qualified name of the smallest non-container module above a parameter."""
    parts = param_name.split(".")[:-1]
    while parts:
        module = model.get_submodule(".".join(parts))
        if not isinstance(module, CONTAINERS):
            return ".".join(parts)
        parts.pop()
    return ""


def _slice(value, i: int, n: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[i : i + 1].detach()
    return value


def replay_per_sample(call: GenericCall, capture: BlockCapture) -> None:
    """Add the exact per-sample gradients of ``call.params`` to ``capture``."""
    if call.grad_out is None:
        return  # a recomputation under gradient checkpointing; its twin received the gradient
    n = capture.batch_size
    names = list(call.params)
    params = [call.params[k] for k in names]
    per_sample = [torch.zeros((n, *p.shape), dtype=torch.float32, device=p.device) for p in params]
    for i in range(n):
        args = tuple(_slice(a, i, n) for a in call.args)
        kwargs = {k: _slice(v, i, n) for k, v in call.kwargs.items()}
        with torch.enable_grad():
            out = call.forward(*args, **kwargs)
            grads = torch.autograd.grad(
                out, params, call.grad_out[i : i + 1].to(out.dtype), allow_unused=True
            )
        for buf, g in zip(per_sample, grads):
            if g is not None:
                buf[i] = g.float()
    for p, buf in zip(params, per_sample):
        capture.add(p, buf)


def detached_call(module: nn.Module, forward, params: dict[str, nn.Parameter], args, kwargs):
    """Run ``forward`` with the module's adapter parameters detached, so autograd does not
    accumulate their (unselected) batch gradient; the gate delivers the selected one."""
    with _reparametrize_module(module, {k: p.detach() for k, p in params.items()}):
        return forward(*args, **kwargs)

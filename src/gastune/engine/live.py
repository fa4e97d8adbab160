"""The parameters a forward really uses, under parameter sharding (FSDP2) as without it.

FSDP2 (``fully_shard`` per decoder block) registers each block's parameters as sharded DTensors
and, for the block's forward and backward, swaps in gathered whole-tensor copies (its
pre-forward hook, which runs before any hook registered later). Autograd sees only those copies:
a gradient taken with respect to the sharded parameters found at attach time is empty, and a
per-sample gradient keyed by a sharded parameter's identity never matches. So the engine
remembers each block parameter by its *name inside the block* and looks the tensor up again
when the block runs. Without sharding the lookup returns the same Parameter.

DeepSpeed ZeRO-3 keeps the Parameter objects but swaps their ``.data``: whole while the module
that owns them runs (its own pre-forward / pre-backward hooks gather them), an empty partition
otherwise. The block gate uses a block's adapter parameters at the *block*, outside their own
modules, so ``gather_with_blocks`` registers them with DeepSpeed as external parameters of the
block (``deepspeed.zero.register_external_parameter``, DeepSpeed's API for a parameter used
outside its owner): DeepSpeed then gathers them for the block's whole forward and backward, the
gate sees whole tensors, and its backward delivers into them while they are whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def names_in_block(block: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
    """The qualified name, inside ``block``, of each parameter in ``params``."""
    names = {id(p): n for n, p in block.named_parameters(remove_duplicate=False)}
    return [names[id(p)] for p in params]


def live_parameters(block: nn.Module, names: Sequence[str]) -> list[torch.Tensor]:
    """The tensors registered under ``names`` right now (inside a forward under FSDP2: the
    gathered copies)."""
    return [block.get_parameter(n) for n in names]


def full_shape(t: torch.Tensor) -> torch.Size:
    """The whole shape of ``t``, also while DeepSpeed ZeRO-3 holds it partitioned (empty)."""
    return getattr(t, "ds_shape", t.shape)


def is_zero3_parameter(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DeepSpeed ZeRO-3 partitioned parameter."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_tensor")


def gather_with_blocks(
    blocks: Sequence[nn.Module], block_parameters: Sequence[Sequence[nn.Parameter]]
) -> list[tuple[nn.Module, nn.Parameter]]:
    """Under DeepSpeed ZeRO-3, have each block's ``block_parameters`` gathered for the whole
    forward and backward of the block (not only of the submodule owning each). Returns the
    registrations (undo with ``release_from_blocks``); without ZeRO-3 it does nothing."""
    registered = []
    for block, params in zip(blocks, block_parameters):
        zero3 = [p for p in params if is_zero3_parameter(p)]
        if zero3:
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter

            for p in zero3:
                register_external_parameter(block, p)
                registered.append((block, p))
    return registered


def release_from_blocks(registered: Sequence[tuple[nn.Module, nn.Parameter]]) -> None:
    """Undo ``gather_with_blocks``."""
    if registered:
        from deepspeed.runtime.zero.partition_parameters import unregister_external_parameter

        for block, p in registered:
            unregister_external_parameter(block, p)


@contextmanager
def parameters_in_use(
    blocks: Sequence[nn.Module], block_parameters: Sequence[Sequence[nn.Parameter]]
) -> Iterator[dict[int, torch.Tensor]]:
    """Yields a dict, filled as each block's forward starts, mapping ``id(param)`` of every
    parameter in ``block_parameters`` to the tensor that forward uses for it.

    Take gradients with respect to ``in_use.get(id(p), p)``: under FSDP2 these are the gathered
    copies autograd sees; otherwise the parameters themselves.

    Example:
        >>> with parameters_in_use(blocks, block_parameters) as in_use:  # doctest: +SKIP
        ...     loss = model(**batch).loss
        >>> torch.autograd.grad(loss, [in_use.get(id(p), p) for p in params])  # doctest: +SKIP
    """
    in_use: dict[int, torch.Tensor] = {}
    handles = []
    for block, params in zip(blocks, block_parameters):
        if not params:
            continue
        names = names_in_block(block, params)
        keys = [id(p) for p in params]

        def hook(module, args, names=names, keys=keys):
            in_use.update(zip(keys, live_parameters(module, names)))

        handles.append(block.register_forward_pre_hook(hook))
    try:
        yield in_use
    finally:
        for handle in handles:
            handle.remove()

"""Reentrant activation checkpointing, made safe for ``torch.autograd.grad`` passes.

With ``gradient_checkpointing_kwargs={"use_reentrant": True}`` a checkpointed layer's adapter
parameters are not inputs of its autograd node: ``torch.autograd.grad(loss, params)`` never
runs that node and returns no gradient at all (GAST's support pass saw all zeros, so every
score was 0 and the choice uniform). ``non_reentrant_checkpointing`` switches transformers'
checkpointed layers to the non-reentrant variant for the duration of such a pass: the same
recomputation and memory, but the parameters are reached.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def _reentrant(func) -> bool:
    return isinstance(func, functools.partial) and bool(func.keywords.get("use_reentrant"))


def uses_reentrant_checkpointing(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is checkpointed with ``use_reentrant=True``."""
    return any(
        getattr(m, "gradient_checkpointing", False)
        and _reentrant(getattr(m, "_gradient_checkpointing_func", None))
        for m in model.modules()
    )


@contextmanager
def non_reentrant_checkpointing(model: nn.Module) -> Iterator[None]:
    """Inside the block, layers checkpointed reentrantly use ``use_reentrant=False`` instead.

    Example:
        >>> with non_reentrant_checkpointing(model):  # doctest: +SKIP
        ...     grads = torch.autograd.grad(loss_of(model(batch)), params)
    """
    swapped: list[tuple[nn.Module, functools.partial]] = []
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if _reentrant(func) and "_gradient_checkpointing_func" in module.__dict__:
            module._gradient_checkpointing_func = functools.partial(
                func.func, *func.args, **{**func.keywords, "use_reentrant": False}
            )
            swapped.append((module, func))
    try:
        yield
    finally:
        for module, func in swapped:
            module._gradient_checkpointing_func = func

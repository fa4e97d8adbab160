"""Resuming an FSDP2 run whose optimizer has no state for some trainable parameters.

Layer-selective methods (LISA, RST, IST, Fisher) leave a layer that has not trained yet without
optimizer state: AdamW creates a parameter's state at its first update. Loading such a
checkpoint under FSDP2 goes through torch's ``set_optimizer_state_dict`` (accelerate calls it),
which (1) refuses a trainable parameter without saved state unless ``strict=False``, and
(2) first gives *every* parameter state by running the optimizer once on zero gradients at
lr 0, and keeps that made-up state where the checkpoint has none: AdamW's step count is then
1 instead of absent, and the layer's first real update after the resume is bias-corrected
differently from the uninterrupted run's (measured: 2.6e-3 on a LoRA B after one step).

``lenient_optimizer_state_loading`` loads non-strictly and then drops the made-up state of the
parameters the checkpoint holds no state for — as in the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist


def _saved_names(optim_state_dict) -> list[str] | None:
    """Names of the parameters with saved state; every rank gets rank 0's list (with
    ``rank0_only`` loading only rank 0 reads the file)."""
    names = None
    if isinstance(optim_state_dict, dict) and isinstance(optim_state_dict.get("state"), dict):
        names = sorted(optim_state_dict["state"])
    if dist.is_available() and dist.is_initialized():
        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
    return names


def drop_unsaved_state(model, optimizers, saved: list[str]) -> int:
    """Remove the optimizer state of every parameter of ``model`` not named in ``saved``.
    Returns how many parameters lost state."""
    names = {id(p): n for n, p in model.named_parameters()}
    saved_set, dropped = set(saved), 0
    for optimizer in optimizers if isinstance(optimizers, (list, tuple)) else (optimizers,):
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = names.get(id(p))
                if name is not None and name not in saved_set and p in optimizer.state:
                    del optimizer.state[p]
                    dropped += 1
    return dropped


@contextmanager
def lenient_optimizer_state_loading() -> Iterator[None]:
    """Within this context FSDP2 optimizer loading accepts parameters without saved state and
    leaves them without state."""
    import torch.distributed.checkpoint.state_dict as state_dict

    original = state_dict.set_optimizer_state_dict

    def load(model, optimizers, optim_state_dict, *, options=None):
        saved = _saved_names(optim_state_dict)
        options = dataclasses.replace(options or state_dict.StateDictOptions(), strict=False)
        result = original(model, optimizers, optim_state_dict, options=options)
        if saved is not None:
            drop_unsaved_state(model, optimizers, saved)
        return result

    # accelerate imports the function from the module at call time: replacing it there suffices
    state_dict.set_optimizer_state_dict = load
    try:
        yield
    finally:
        state_dict.set_optimizer_state_dict = original

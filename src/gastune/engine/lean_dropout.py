"""LoRA dropout that saves a 1-byte mask for backward instead of two copies of its input.

peft computes ``lora_B(lora_A(dropout(x)))`` in every adapted module. Under autograd, CPU
dropout saves its fp32 noise tensor (4 B per element of ``x``) and ``lora_A`` saves the dropped
input (4 B more), separately in each module: q, k and v keep six copies of their one shared
input between them. For SmolLM2-135M with LoRA on q,k,v,up,down at 16 × 256 that is ≈ 3.6 GB
of the step's ≈ 7 GB of saved activations (``benchmarks/saved_memory.py``).

``lean_lora_dropout(model)``, for the duration of a forward:

- each peft LoRA dropout (``nn.Dropout``, 0 < p < 1) draws its mask exactly as ``F.dropout``
  does (the same random numbers, the same result, bit for bit) and saves only a bool mask;
- when autograd saves such a dropout's output for backward (``lora_A``'s input, or the GAST
  engine's per-sample linear), it saves ``(x, mask)`` instead and recomputes the output when
  backward needs it. ``x`` is the module's input, shared by q, k and v.

So each adapted module keeps 1 B per input element instead of 8, plus one fp32 copy of each
distinct input. Results are unchanged: the recomputed output is the original bit for bit,
and the dropout's own gradient is the same product ``grad * noise`` autograd forms.

Only the call inside the context is changed (the Trainer's loss and GAST's support pass,
``gastune.engine.fused_loss.model_per_sample_loss``); the model is restored on exit. Inside a
region whose saved tensors another hook owns (activation checkpointing), and when the
installed torch lacks the hook query used, dropout runs unchanged, so a checkpoint's
recomputation sees the same saved tensors it recorded.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# Where F.dropout runs the fused native_dropout kernel (a bool mask) rather than bernoulli noise.
_FUSED_DEVICES = ("cuda", "xpu")
_TOP_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _top_hooks():
    """The innermost saved-tensor hooks ``(pack, unpack)`` now in force, or ``None``."""
    try:
        return _TOP_HOOKS(False)  # argument: ignore_is_tracing
    except TypeError:  # another torch's signature: treated as "not ours", dropout unchanged
        return None


class _MaskedDropout(torch.autograd.Function):
    """``F.dropout(x, p, training=True)`` (same draw, same result) saving a bool mask."""

    @staticmethod
    def forward(ctx, x, p, out_recipe):
        if x.device.type in _FUSED_DEVICES:
            out, mask = torch.native_dropout(x, p, True)
            scale = 1.0 / (1.0 - p)  # what autograd's native_dropout backward uses
        else:  # ATen's composite dropout: fp32 noise 0 or 1/(1-p), then x * noise
            noise = torch.empty_like(x).bernoulli_(1 - p)
            noise.div_(1 - p)
            out = x * noise
            mask = noise != 0
            scale = noise.amax()  # the exact nonzero value (0 if everything was dropped)
            del noise
        ctx.save_for_backward(mask)
        ctx.scale = scale
        out_recipe.append(Dropped(x, mask, scale))
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return apply_mask(grad, mask, ctx.scale), None, None


def apply_mask(x: torch.Tensor, mask: torch.Tensor, scale) -> torch.Tensor:
    """``x * noise`` for the noise behind ``mask``, as the dropout formed it."""
    if isinstance(scale, float):  # the fused kernel's formula
        return torch.ops.aten.native_dropout_backward(x, mask, scale)
    return x * torch.where(mask, scale, 0.0)  # exactly the noise tensor (0 or the scale)


@dataclass
class Dropped:
    """How to recompute a dropout's output from its input and mask."""

    source: torch.Tensor
    mask: torch.Tensor
    scale: object  # 0-dim tensor (composite dropout) or float (fused kernel)
    version: int = -1
    stride: tuple[int, ...] = ()  # the output's layout, which a view of it refers to

    def recompute(self) -> torch.Tensor:
        if self.source._version != self.version:
            raise RuntimeError(
                "gastune: the input of a LoRA dropout was modified in place before backward; "
                "its output cannot be recomputed"
            )
        out = apply_mask(self.source.detach(), self.mask, self.scale)
        if out.stride() != self.stride:  # the same inputs give the same layout; be sure anyway
            out = torch.empty_strided(out.shape, self.stride, dtype=out.dtype, device=out.device).copy_(out)
        return out


@dataclass
class DroppedView:
    """A view of a dropout's output (``F.linear`` saves its 3-D input flattened to 2-D)."""

    dropped: Dropped
    size: torch.Size
    stride: tuple[int, ...]
    offset: int  # relative to the output's own storage offset

    def recompute(self) -> torch.Tensor:
        out = self.dropped.recompute()
        return out.as_strided(self.size, self.stride, out.storage_offset() + self.offset)


class _Registry:
    """The dropout outputs of one forward, by identity, and the saved-tensor hooks that swap
    them (or views of them) for their recipe."""

    def __init__(self):
        self.outputs: dict[int, tuple[weakref.ref, Dropped, int]] = {}
        self.recomputable = 0  # tensors saved for backward as a recipe (for tests)
        self.pack = self._pack  # one bound object: compared with the top of the hook stack
        self.unpack = self._unpack

    def on_top(self) -> bool:
        top = _top_hooks()
        return top is not None and top[0] is self.pack

    def add(self, out: torch.Tensor, recipe: Dropped) -> None:
        key = id(out)
        recipe.version, recipe.stride = recipe.source._version, out.stride()
        self.outputs[key] = (
            weakref.ref(out, lambda _, key=key: self.outputs.pop(key, None)),
            recipe,
            out._version,
        )

    def _pack(self, t: torch.Tensor):
        base = t if id(t) in self.outputs else t._base
        entry = self.outputs.get(id(base)) if base is not None else None
        if entry is None or entry[0]() is not base or base._version != entry[2]:
            return t
        self.recomputable += 1
        if base is t:
            return entry[1]
        return DroppedView(entry[1], t.size(), t.stride(), t.storage_offset() - base.storage_offset())

    @staticmethod
    def _unpack(packed):
        return packed.recompute() if isinstance(packed, (Dropped, DroppedView)) else packed


def _lora_dropouts(model: nn.Module) -> list[nn.Dropout]:
    found = []
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for d in dropouts.values():
            if type(d) is nn.Dropout and not d.inplace and 0.0 < d.p < 1.0 and "forward" not in d.__dict__:
                found.append(d)
    return found


def _lean_forward(module: nn.Dropout, registry: _Registry):
    original = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if (
            not module.training
            or not torch.is_grad_enabled()
            or x.numel() == 0
            or x.device.type not in ("cpu", *_FUSED_DEVICES)
            or not registry.on_top()  # inside a checkpointed region, or the hooks were left
        ):
            return original(x)
        recipe: list[Dropped] = []
        out = _MaskedDropout.apply(x, module.p, recipe)
        registry.add(out, recipe[0])
        return out

    return forward


@contextmanager
def lean_lora_dropout(model: nn.Module) -> Iterator[_Registry | None]:
    """Run the model's peft LoRA dropouts lean (see the module docstring) while inside.

    Yields the registry (``.recomputable`` counts the dropout outputs saved as a recipe), or
    ``None`` when there is nothing to change.

    Example:
        >>> with lean_lora_dropout(peft_model):  # doctest: +SKIP
        ...     loss = peft_model(**batch).loss
        >>> loss.backward()  # doctest: +SKIP
    """
    dropouts = _lora_dropouts(model) if _TOP_HOOKS is not None else []
    if not dropouts:
        yield None
        return
    registry = _Registry()
    for d in dropouts:
        d.forward = _lean_forward(d, registry)
    try:
        with torch.autograd.graph.saved_tensors_hooks(registry.pack, registry.unpack):
            yield registry
    finally:
        for d in dropouts:
            del d.forward
        registry.outputs.clear()

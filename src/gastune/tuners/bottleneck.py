"""Series and Parallel bottleneck adapters, as LLM-Adapters trains them — for any causal LM.

peft has no bottleneck adapter (and cannot register a new ``PeftType``); the original lives in
LLM-Adapters' fork of peft 0.3 (``tuners/bottleneck.py``). This is a small re-implementation
without that fork's model-type map. A target ``nn.Linear`` (or GPT-2 ``Conv1D``) ``f`` is
wrapped in place by ``BottleneckLayer``, with ``a(z) = s · up(act(down(dropout(z))))``:

- series, position ``output`` (the fork's ``output_adapter``): ``h = f(x);  y = h + a(h)``
- series, position ``input`` (the fork's ``mh_adapter``):      ``y = f(x + a(x))``
- parallel:                                                   ``y = f(x) + a(x)``

``down`` is Kaiming-uniform and ``up`` zero (the fork's ``mam_adapter`` init), so an
untrained adapter is the identity. Both are bias-free ``nn.Linear`` kept in fp32 (the fork
computes adapters in fp32): GAST's engine treats them like LoRA's A and B, with exact
per-sample gradients inside back-propagation. ``s`` is a float, or ``"learned"`` (a
one-element parameter starting at 1, in its own small module so the engine's generic path
handles it). Adapter modules sit inside the wrapped layer, hence inside its decoder block,
so they are grouped by block like every other tuner's tensors.

Example:
    >>> from gastune.tuners import BottleneckConfig, apply_bottleneck
    >>> model = apply_bottleneck(model, BottleneckConfig("parallel", bottleneck_size=64))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gastune.errors import GastuneError

KINDS = ("series", "parallel")
POSITIONS = ("output", "input")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def parse_scaling(value: float | int | str) -> float | str:
    """A float, or ``"learned"``; an int or a number written as text is a float too (the fork
    left the scaling unset for an int such as ``--scaling 1``)."""
    if isinstance(value, str):
        if value.strip().lower() == "learned":
            return "learned"
        try:
            value = float(value)
        except ValueError:
            raise GastuneError(f"adapter scaling must be a number or 'learned', got '{value}'") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GastuneError(f"adapter scaling must be a finite number or 'learned', got {value!r}")
    return float(value)


@dataclass(frozen=True)
class BottleneckConfig:
    """A bottleneck adapter's settings (LLM-Adapters' defaults).

    Attributes:
        kind: ``series`` or ``parallel``.
        bottleneck_size: width of the bottleneck (the paper's 256).
        non_linearity: one of ``ACTIVATIONS`` (default tanh).
        dropout: dropout on the adapter's input (default 0).
        scaling: a float, or ``"learned"``.
        position: series only: ``output`` (after the module) or ``input`` (before it).
        target_modules: module names (a name matches a module whose qualified name equals it
            or ends with ``.name``); ``None`` = the default placement (``placement.py``).
    """

    kind: str
    bottleneck_size: int = 256
    non_linearity: str = "tanh"
    dropout: float = 0.0
    scaling: float | str = 1.0
    position: str = "output"
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GastuneError(f"unknown bottleneck adapter '{self.kind}'; choose one of {', '.join(KINDS)}")
        if isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int):
            raise GastuneError(f"bottleneck size must be an integer, got {self.bottleneck_size!r}")
        if self.bottleneck_size <= 0:
            raise GastuneError(f"bottleneck size must be ≥ 1, got {self.bottleneck_size}")
        if self.non_linearity not in ACTIVATIONS:
            raise GastuneError(
                f"unknown non-linearity '{self.non_linearity}'; choose one of {', '.join(ACTIVATIONS)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise GastuneError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        if self.position not in POSITIONS:
            raise GastuneError(f"adapter position must be output or input, got '{self.position}'")
        if self.kind == "parallel" and self.position != "output":
            raise GastuneError("adapter position 'input' is for series adapters; a parallel one has none")
        object.__setattr__(self, "scaling", parse_scaling(self.scaling))
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear`` (bitsandbytes' included) or a
    GPT-2-style ``Conv1D`` (weight stored ``(in, out)``); None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1])
    return None


class LearnedScale(nn.Module):
    """``x · w`` with a learned one-element ``w`` (starts at 1)."""

    def __init__(self, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, device=device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class BottleneckLayer(nn.Module):
    """A target module with a series or parallel bottleneck adapter (see the module doc).

    ``scaling`` is a runtime output factor (``{"default": 1.0}``) with peft's
    ``scale_layer``/``unscale_layer`` API, so IST's response suppression scales these adapters'
    output like a LoRA layer's; it is not saved.
    """

    def __init__(self, base_layer: nn.Module, config: BottleneckConfig):
        super().__init__()
        shape = linear_shape(base_layer)
        if shape is None:
            raise GastuneError(
                f"a bottleneck adapter wraps a Linear or Conv1D layer, not a {type(base_layer).__name__}"
            )
        d_in, d_out = shape
        self.config = config
        self.base_layer = base_layer
        if config.kind == "parallel":
            width_in, width_out = d_in, d_out
        else:  # series: a residual adapter on the module's output (or input)
            width_in = width_out = d_out if config.position == "output" else d_in
        device = base_layer.weight.device
        self.adapter_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.adapter_down = nn.Linear(width_in, config.bottleneck_size, bias=False, device=device)
        self.adapter_act = ACTIVATIONS[config.non_linearity]()
        self.adapter_up = nn.Linear(config.bottleneck_size, width_out, bias=False, device=device)
        self.adapter_scale = LearnedScale(device) if config.scaling == "learned" else None
        self.scaling = {"default": 1.0}
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_up.weight)

    def adapter(self, z: torch.Tensor) -> torch.Tensor:
        """``s · up(act(down(dropout(z))))`` computed in fp32, returned in ``z``'s dtype."""
        out = self.adapter_down(self.adapter_dropout(z.to(self.adapter_down.weight.dtype)))
        out = self.adapter_up(self.adapter_act(out))
        out = self.adapter_scale(out) if self.adapter_scale is not None else out * self.config.scaling
        if self.scaling["default"] != 1.0:
            out = out * self.scaling["default"]
        return out.to(z.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.config.kind == "parallel":
            return self.base_layer(x, *args, **kwargs) + self.adapter(x)
        if self.config.position == "input":
            return self.base_layer(x + self.adapter(x), *args, **kwargs)
        h = self.base_layer(x, *args, **kwargs)
        return h + self.adapter(h)

    def scale(self) -> float:
        """The adapter's scale ``s`` now (the learned value, or the configured float)."""
        if self.adapter_scale is not None:
            return float(self.adapter_scale.weight.detach())
        return float(self.config.scaling)

    def scale_layer(self, factor: float) -> None:
        self.scaling["default"] *= factor

    def unscale_layer(self, factor: float | None = None) -> None:
        self.scaling["default"] = 1.0 if factor is None else self.scaling["default"] / factor


def bottleneck_layers(model: nn.Module) -> dict[str, BottleneckLayer]:
    """Every ``BottleneckLayer`` in ``model`` by qualified name (empty for other models)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BottleneckLayer)}


def has_bottleneck(model: nn.Module) -> bool:
    return any(isinstance(m, BottleneckLayer) for m in model.modules())


def wrap_modules(model: nn.Module, names: list[str], config: BottleneckConfig) -> nn.Module:
    """Freeze ``model`` and wrap each named module in place; the adapters are trainable."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, BottleneckLayer(model.get_submodule(name), config))
    return model

"""Where bottleneck adapters go: the user's target names, or a default found by shape.

LLM-Adapters' LLaMA scripts (its ``math_running_commands``, also used for commonsense) put
series adapters on ``up_proj, gate_proj`` — which its fork's LLaMA map turns into adapters on
the MLP *input* — and parallel adapters beside ``up_proj, down_proj``. Its map puts the
output adapter after ``down_proj``. The defaults here are those placements, found without a
model-type map from the shapes of the first decoder block's Linear/Conv1D layers, with
``H`` the embedding width:

- MLP output projections: ``in > H`` and ``out == H`` (LLaMA/Qwen ``down_proj``, GPT-2
  ``mlp.c_proj``; attention output projections are ``H → H`` and do not match);
- MLP input projections: ``in == H`` and ``out`` = an MLP output projection's ``in``
  (``gate_proj`` and ``up_proj``; GPT-2 ``c_fc``, not the ``H → 3H`` ``c_attn``).

Defaults: series/output → the MLP output projections; series/input → the MLP input
projections (the fork's series script exactly); parallel → the MLP output projections plus
the input projection named ``up_proj`` when a gated MLP has one (the fork's parallel script),
else every MLP input projection (GPT-J/BLOOM scripts: ``fc_in, fc_out``).
"""

from __future__ import annotations

from torch import nn

from gastune.errors import GastuneError
from gastune.models.blocks import find_decoder_blocks
from gastune.tuners.bottleneck import BottleneckConfig, has_bottleneck, linear_shape, wrap_modules


def mlp_projections(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(inputs, outputs)``: block-relative names of the MLP's input and output projections."""
    block = find_decoder_blocks(model).blocks[0]
    hidden = model.get_input_embeddings().embedding_dim
    shapes = {name: s for name, m in block.named_modules() if name and (s := linear_shape(m))}
    outputs = [n for n, (i, o) in shapes.items() if o == hidden and i > hidden]
    inner = {shapes[n][0] for n in outputs}
    inputs = [n for n, (i, o) in shapes.items() if i == hidden and o in inner]
    return inputs, outputs


def default_targets(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """Block-relative module names for ``config``'s default placement (see the module doc)."""
    inputs, outputs = mlp_projections(model)
    if config.kind == "series":
        chosen = outputs if config.position == "output" else inputs
    else:
        up = [n for n in inputs if n.rsplit(".", 1)[-1] == "up_proj"]
        chosen = outputs + (up or inputs)
    if not chosen:
        raise GastuneError(
            f"found no MLP projections in {type(model).__name__}'s decoder blocks for the default "
            f"{config.kind} adapter placement; name the layers with --target_modules"
        )
    return chosen


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_targets(model: nn.Module, config: BottleneckConfig) -> list[str]:
    """Qualified names of the modules to wrap; every target must match a Linear/Conv1D layer."""
    targets = list(config.target_modules or default_targets(model, config))
    names = [name for name, _ in model.named_modules() if name]
    chosen: list[str] = []
    for target in targets:
        hits = [n for n in names if _matches(n, target)]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if linear_shape(m)})
            raise GastuneError(
                f"target module '{target}' matches nothing in {type(model).__name__} "
                f"(its linear layers are named e.g. {', '.join(leaves[:12])})"
            )
        for hit in hits:
            module = model.get_submodule(hit)
            if linear_shape(module) is None:
                raise GastuneError(
                    f"target module '{hit}' is a {type(module).__name__}; bottleneck adapters wrap "
                    "Linear or Conv1D layers"
                )
            if hit not in chosen:
                chosen.append(hit)
    return chosen


def apply_bottleneck(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Add fresh bottleneck adapters to ``model`` (in place; returned for chaining).

    Only the adapters train afterwards. Raises ``GastuneError`` when no module matches the
    targets, a target is not a Linear/Conv1D layer, or the model already has adapters.
    """
    if has_bottleneck(model):
        raise GastuneError("the model already has bottleneck adapters")
    return wrap_modules(model, resolve_targets(model, config), config)

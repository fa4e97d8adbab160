"""Save, load and merge bottleneck adapters.

A saved adapter is a folder with ``bottleneck_config.json`` (the ``BottleneckConfig``, the
qualified names of the wrapped modules and a format tag) and ``bottleneck_model.safetensors``
(the adapter tensors only, keyed ``<module>.adapter_down.weight`` …; never the base model).

Merging: an adapter whose non-linearity is ``identity`` is linear in its input, ``a(z) = M z``
with ``M = s·U·D``, so it folds into the wrapped layer's weight exactly (dropout is off at
inference): parallel ``W + M``; series/output ``(I + M) W`` and ``(I + M) b``; series/input
``W (I + M)``. With any other non-linearity (tanh, the default) the adapter is not linear and
no merge is exact: ``merge_bottleneck`` refuses.

Example:
    >>> save_bottleneck(model, "runs/series")                     # doctest: +SKIP
    >>> model = load_bottleneck(load_model("smollm2-135m"), "runs/series")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import nn

from gastune.errors import GastuneError
from gastune.tuners.bottleneck import (
    BottleneckConfig,
    BottleneckLayer,
    bottleneck_layers,
    linear_shape,
    wrap_modules,
)

CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "bottleneck_model.safetensors"
FORMAT = "gastune-bottleneck-adapter"
FILES = (CONFIG_NAME, WEIGHTS_NAME)  # what a saved adapter folder holds


def is_bottleneck_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


def adapter_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` (taken from ``state_dict`` when given, e.g. a
    DeepSpeed-gathered one), keyed by qualified name."""
    keys = [
        f"{name}.{pname}"
        for name, layer in bottleneck_layers(model).items()
        for pname, _ in layer.named_parameters()
        if not pname.startswith("base_layer.")
    ]
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    missing = [k for k in keys if k not in source]
    if missing:  # never write an adapter with tensors left out
        raise GastuneError(
            f"the state dict to save lacks {len(missing)} adapter tensors, e.g. '{missing[0]}'"
        )
    return {k: source[k].detach().to("cpu").contiguous() for k in keys}


def save_bottleneck(model: nn.Module, folder: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Write ``model``'s adapters (only) and their config into ``folder``."""
    from safetensors.torch import save_file

    layers = bottleneck_layers(model)
    if not layers:
        raise GastuneError("the model has no bottleneck adapters to save")
    config = next(iter(layers.values())).config
    tensors = adapter_state_dict(model, state_dict)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Weights first, config last: a folder with a config is a complete adapter.
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {"format": FORMAT, **asdict(config), "modules": list(layers)}
    meta["target_modules"] = list(config.target_modules) if config.target_modules else None
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def read_config(folder: str | os.PathLike) -> tuple[BottleneckConfig, list[str]]:
    """``(config, wrapped module names)`` from a saved adapter folder."""
    path = Path(folder) / CONFIG_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GastuneError(f"cannot read the bottleneck adapter config {path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not meta.get("modules"):
        raise GastuneError(f"{path} is not a gastune bottleneck adapter config")
    known = {f.name for f in fields(BottleneckConfig)}
    return BottleneckConfig(**{k: v for k, v in meta.items() if k in known}), list(meta["modules"])


def _expected_shapes(module: nn.Module, config: BottleneckConfig) -> dict[str, tuple[int, ...]]:
    d_in, d_out = linear_shape(module)
    if config.kind == "parallel":
        width_in, width_out = d_in, d_out
    else:
        width_in = width_out = d_out if config.position == "output" else d_in
    b = config.bottleneck_size
    shapes = {"adapter_down.weight": (b, width_in), "adapter_up.weight": (width_out, b)}
    if config.scaling == "learned":
        shapes["adapter_scale.weight"] = (1,)
    return shapes


def _check_against(model: nn.Module, folder, config, modules, tensors) -> None:
    """Every saved module exists here with the widths the adapter was trained on."""
    for name in modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if module is None or linear_shape(module) is None:
            raise GastuneError(
                f"the {config.kind} adapter in {folder} wraps '{name}', which {type(model).__name__} "
                "does not have as a Linear/Conv1D layer: it was trained on another architecture"
            )
        for leaf, shape in _expected_shapes(module, config).items():
            saved = tensors.get(f"{name}.{leaf}")
            if saved is None:
                raise GastuneError(f"{folder}/{WEIGHTS_NAME} lacks '{name}.{leaf}'")
            if tuple(saved.shape) != shape:
                raise GastuneError(
                    f"the {config.kind} adapter in {folder} was trained on a model of another width: "
                    f"'{name}.{leaf}' is {tuple(saved.shape)} there, this model needs {shape}"
                )


def load_bottleneck(model: nn.Module, folder: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """Wrap ``model`` with the adapters saved in ``folder`` (in place; returned).

    Raises ``GastuneError`` when the folder is not a bottleneck adapter or was trained on a
    model of another architecture or width.
    """
    from safetensors.torch import load_file

    config, modules = read_config(folder)
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.is_file():
        raise GastuneError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    tensors = load_file(str(weights))
    _check_against(model, folder, config, modules, tensors)
    wrap_modules(model, modules, config)
    load_adapter_weights(model, tensors)
    for layer in bottleneck_layers(model).values():
        for name, param in layer.named_parameters():
            param.requires_grad_(trainable and not name.startswith("base_layer."))
    return model


def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter tensors into ``model``'s existing adapters (same set of names)."""
    params = dict(model.named_parameters())
    expected = set(adapter_state_dict(model))
    if set(tensors) != expected:
        raise GastuneError(
            f"saved adapter tensors do not match the model's adapters "
            f"(missing {sorted(expected - set(tensors))[:3]}, unexpected {sorted(set(tensors) - expected)[:3]})"
        )
    wrong = [k for k, v in tensors.items() if v.shape != params[k].shape]
    if wrong:
        raise GastuneError(
            f"saved adapter tensor '{wrong[0]}' is {tuple(tensors[wrong[0]].shape)}, the model's is "
            f"{tuple(params[wrong[0]].shape)} (another bottleneck size or model width)"
        )
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value.to(params[key].device))


def load_bottleneck_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Resume: load a checkpoint's adapter tensors into ``model``'s adapters."""
    from safetensors.torch import load_file

    load_adapter_weights(model, load_file(str(Path(folder) / WEIGHTS_NAME)))


def _merged(layer: BottleneckLayer) -> nn.Module:
    base, config = layer.base_layer, layer.config
    if config.non_linearity != "identity":
        raise GastuneError(
            f"a {config.kind} adapter with non-linearity {config.non_linearity} cannot be merged into "
            "the base weights (it is not linear in its input); only non_linearity identity merges exactly"
        )
    is_linear = type(base) is nn.Linear
    if not (is_linear or type(base).__name__ == "Conv1D") or not base.weight.dtype.is_floating_point:
        raise GastuneError(f"cannot merge an adapter into a {type(base).__name__} layer (quantized?)")
    with torch.no_grad():
        m = layer.scale() * layer.scaling["default"] * (layer.adapter_up.weight @ layer.adapter_down.weight)
        w = base.weight.float() if is_linear else base.weight.float().T  # (out, in)
        eye = torch.eye(m.shape[0], device=m.device)
        if config.kind == "parallel":
            w = w + m
        elif config.position == "input":
            w = w @ (eye + m)
        else:
            w = (eye + m) @ w
            if base.bias is not None:
                base.bias.copy_(((eye + m) @ base.bias.float()).to(base.bias.dtype))
        base.weight.copy_((w if is_linear else w.T).to(base.weight.dtype))
    return base


def merge_bottleneck(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weights and remove the wrappers (in place; returned).

    Exact for ``non_linearity="identity"`` adapters; refuses (``GastuneError``) otherwise.
    """
    layers = bottleneck_layers(model)
    merged = {name: _merged(layer) for name, layer in layers.items()}
    for name, base in merged.items():
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, base)
    return model

"""Find a model's decoder blocks and group trainable parameters by block — for any family.

No model-class map: the blocks are the longest ``nn.ModuleList`` whose items belong to the
classes the model itself lists in ``_no_split_modules`` (the unit transformers never splits
across devices, i.e. the decoder layer). Failing that, the longest ModuleList of identical
modules that own parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from gastune.errors import GastuneError


@dataclass(frozen=True)
class BlockList:
    """The decoder blocks of a model and where they sit.

    Attributes:
        prefix: qualified name of the ModuleList holding the blocks (e.g. ``model.layers``).
        blocks: the block modules, in forward order.
    """

    prefix: str
    blocks: tuple[nn.Module, ...]

    def __len__(self) -> int:
        return len(self.blocks)


def _no_split_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def find_decoder_blocks(model: nn.Module) -> BlockList:
    """Return the model's decoder blocks (works through peft wrappers and DDP).

    Raises:
        GastuneError: the model has no recognisable stack of decoder blocks.
    """
    no_split = _no_split_names(model)
    best: tuple[int, str, nn.ModuleList] | None = None
    fallback: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(m).__name__ for m in module}
        if len(kinds) != 1:
            continue
        owns_params = any(True for _ in module[0].parameters())
        if no_split and kinds <= no_split and (best is None or len(module) > best[0]):
            best = (len(module), name, module)
        elif owns_params and len(module) > 1 and (fallback is None or len(module) > fallback[0]):
            fallback = (len(module), name, module)
    chosen = best or fallback
    if chosen is None:
        raise GastuneError(f"{type(model).__name__} has no stack of decoder layers to select from")
    return BlockList(prefix=chosen[1], blocks=tuple(chosen[2]))


_INDEX = re.compile(r"^\.(\d+)\.")


def block_index_of(param_name: str, blocks: BlockList) -> int | None:
    """Index of the block that holds the parameter ``param_name``, or None outside blocks."""
    if not param_name.startswith(blocks.prefix + "."):
        return None
    match = _INDEX.match(param_name[len(blocks.prefix) :])
    return int(match.group(1)) if match else None


def trainable_by_block(
    model: nn.Module, blocks: BlockList | None = None
) -> tuple[list[list[tuple[str, nn.Parameter]]], list[tuple[str, nn.Parameter]]]:
    """Split trainable parameters into per-block lists and the rest (outside blocks).

    Returns:
        ``(per_block, outside)``: ``per_block[l]`` lists ``(name, param)`` of block ``l``.
    """
    blocks = blocks or find_decoder_blocks(model)
    per_block: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(len(blocks))]
    outside: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        index = block_index_of(name, blocks)
        (outside if index is None else per_block[index]).append((name, param))
    return per_block, outside


def count_parameters(params: list[tuple[str, torch.Tensor]]) -> int:
    return sum(p.numel() for _, p in params)

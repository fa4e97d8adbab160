"""A quantised base model (QLoRA): bitsandbytes 4-bit NF4 or 8-bit weights under the adapter.

The base weights are frozen ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` modules; the adapter
tensors stay in full precision and train with every method (the GAST engine only ever computes
per-sample gradients of the adapter's own ``nn.Linear`` modules, and back-propagates through the
quantised base like any frozen layer). bitsandbytes is the optional extra ``qlora``; its PyPI
wheel also runs on the CPU.

Example:
    >>> from gastune.models.quantization import quantization_config
    >>> quantization_config(load_in_4bit=False, load_in_8bit=False) is None
    True
"""

from __future__ import annotations

import importlib.util

import torch

from gastune.errors import GastuneError

QLORA_INSTALL_HINT = "pip install -c constraints.txt 'gastune[qlora]' (bitsandbytes)"


def quantization_config(
    load_in_4bit: bool = False, load_in_8bit: bool = False, compute_dtype: torch.dtype = torch.float32
):
    """transformers' ``BitsAndBytesConfig`` for the flags, or ``None`` for a full-precision base.

    4-bit is QLoRA's recipe: NF4 with double quantisation; the de-quantised matmuls run in
    ``compute_dtype`` (bf16 under ``--bf16``, else fp32).
    """
    if load_in_4bit and load_in_8bit:
        raise GastuneError("--load_in_4bit and --load_in_8bit exclude each other; choose one")
    if not (load_in_4bit or load_in_8bit):
        return None
    flag = "--load_in_4bit" if load_in_4bit else "--load_in_8bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise GastuneError(f"{flag} needs bitsandbytes, which is not installed: {QLORA_INSTALL_HINT}")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds bitsandbytes-quantised layers (a 4-bit or 8-bit base)."""
    return any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())


def keep_cpu_weights_unpacked(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On a CPU with AVX512-BF16, ``Linear4bit`` repacks its weight (absmax rounded to bf16) the
    first time it runs in eval mode on an input without gradient, and keeps that format: a
    method's eval-mode scoring pass (Fisher, IST's probes) would silently change the base that
    training then uses, and the repacking fails on layers narrower than one 64-value block.
    Training needs the base as loaded. Returns ``model``.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model

"""What makes a run the same run: the settings a resume must not silently change.

Every checkpoint's manifest (``gastune.training.checkpoint``) records the run's identity:
the base model, the method, the tuner and its shape, the batch (per device, gradient
accumulation, world size) and a fingerprint of the training data. A resume compares it with
the run being started and fails, listing the keys that differ. ``resume_allow_mismatch``
lets the non-shape keys differ (with a warning: e.g. a model folder that moved); the shape
keys never may, since the saved adapter would not fit (docs/reliability.md).

Example:
    >>> differences({"method": "gast", "lora_r": 2}, {"method": "ist", "lora_r": 2})
    ['method']
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch

from gastune.errors import GastuneError

logger = logging.getLogger(__name__)

SHAPE_KEYS = ("tuner", "lora_r", "target_modules")


def run_identity(trainer) -> dict[str, Any]:
    """The identity of the run a ``GastuneMixin`` trainer is about to do."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    args = trainer.args
    identity: dict[str, Any] = {"model": getattr(getattr(model, "config", None), "_name_or_path", None)}
    identity["method"] = getattr(args, "method", None) or trainer.method.name
    identity.update(_adapter_identity(model))
    identity["per_device_train_batch_size"] = args.per_device_train_batch_size
    identity["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    identity["world_size"] = args.world_size
    identity["data"] = data_fingerprint(trainer.train_dataset)
    return identity


def _adapter_identity(model) -> dict[str, Any]:
    configs = getattr(model, "peft_config", None)
    if not configs:
        return {"tuner": None, "lora_r": None, "lora_alpha": None, "target_modules": None}
    cfg = next(iter(configs.values()))
    tuner = str(getattr(cfg.peft_type, "value", cfg.peft_type)).lower()
    if getattr(cfg, "use_dora", False):
        tuner = "dora"
    targets = cfg.target_modules
    return {
        "tuner": tuner,
        "lora_r": getattr(cfg, "r", None),
        "lora_alpha": getattr(cfg, "lora_alpha", getattr(cfg, "alpha", None)),
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
    }


def data_fingerprint(dataset) -> str | None:
    """sha256 over every item's tokens and labels (None for a dataset without a length)."""
    if dataset is None or not hasattr(dataset, "__len__"):
        return None
    digest = hashlib.sha256()
    digest.update(str(len(dataset)).encode())
    for i in range(len(dataset)):
        item = dataset[i]
        for key in ("input_ids", "labels", "attention_mask"):
            value = item.get(key) if isinstance(item, dict) else None
            if value is None:
                continue
            digest.update(key.encode())
            digest.update(torch.as_tensor(value, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys present in both identities whose values differ (lists compare as lists)."""
    return sorted(k for k in saved.keys() & current.keys() if _norm(saved[k]) != _norm(current[k]))


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def check_same_run(
    saved: dict[str, Any] | None, current: dict[str, Any], folder: str, allow: bool
) -> list[str]:
    """Fail unless the checkpoint in ``folder`` was made by a run with ``current``'s identity.

    Returns the keys that differ and were allowed (``allow``: all but the shape keys).
    A checkpoint without an identity (older ones) is accepted; its adapter shapes are still
    checked against the model before loading (``check_adapter_shapes``).
    """
    if not saved:
        return []
    diff = differences(saved, current)
    if not diff:
        return []
    described = ", ".join(
        f"{k} ({_short(saved[k])} in the checkpoint, {_short(current[k])} now)" for k in diff
    )
    shape = [k for k in diff if k in SHAPE_KEYS]
    if shape:
        raise GastuneError(
            f"checkpoint {folder} was made by a different run: {described}; "
            "its adapter cannot be loaded into this one"
        )
    if not allow:
        raise GastuneError(
            f"checkpoint {folder} was made by a different run: {described}; "
            "pass --resume_allow_mismatch true to resume anyway"
        )
    logger.warning("resuming %s although %s", folder, described)
    return diff


def check_adapter_shapes(model, folder: str) -> None:
    """Fail in one line if the adapter saved in ``folder`` does not fit ``model``'s adapter
    (different rank, targets or tuner), instead of peft's size-mismatch traceback."""
    from pathlib import Path

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file() or not getattr(model, "peft_config", None):
        return
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    with safe_open(str(path), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not a dict)
    for key in sorted(expected.keys() | saved.keys()):
        if expected.get(key) != saved.get(key):
            raise GastuneError(
                f"checkpoint {folder}: its adapter does not fit this model: {key} is "
                f"{_shape(saved.get(key))} in the checkpoint, {_shape(expected.get(key))} here "
                "(different tuner, lora_r or target_modules?)"
            )


def _shape(shape) -> str:
    return "absent" if shape is None else str(list(shape))


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."

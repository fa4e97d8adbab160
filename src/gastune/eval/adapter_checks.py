"""Checks on an adapter folder before it is scored: scores that cannot be honest are refused.

- The folder must hold peft's config and weights: a local folder never reaches a model hub
  (peft would otherwise take the missing weights' folder name for a hub repository).
- The weights must be finite: a diverged adapter's NaNs make every log-probability NaN, and
  the first label then "wins" every question (a plausible-looking accuracy).
- The base model must be the one the adapter was trained on (``adapter_config.json``'s
  ``base_model_name_or_path`` and ``gastune_config.json``'s model), unless the user says so.

Each check is a one-line ``GastuneError``, raised before the base model is loaded;
``check_finite_parameters`` then checks the loaded model itself before any scoring.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from gastune.errors import GastuneError
from gastune.models.loading import DEFAULT_MODEL, default_model_target
from gastune.tuners import is_bottleneck_folder
from gastune.tuners.bottleneck_io import WEIGHTS_NAME as BOTTLENECK_WEIGHTS

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter(adapter: str, model: str, allow_base_mismatch: bool = False) -> Path:
    """Run every check on the adapter folder ``adapter`` for base model ``model``.

    Example:
        >>> check_adapter("runs/lora", "smollm2-135m")  # doctest: +SKIP
    """
    folder = Path(adapter)
    if is_bottleneck_folder(folder):  # gastune's series/parallel adapter (gastune.tuners)
        weights = folder / BOTTLENECK_WEIGHTS
        if not weights.is_file():
            raise GastuneError(f"'{adapter}' has no adapter weights ({BOTTLENECK_WEIGHTS})")
        check_finite_weights(weights)
        check_base_model(folder, model, allow_base_mismatch)
        return weights
    if not (folder / ADAPTER_CONFIG).is_file():
        raise GastuneError(f"'{adapter}' is not a peft adapter folder (no {ADAPTER_CONFIG})")
    weights = next((folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise GastuneError(
            f"'{adapter}' has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}): "
            "an unfinished or failed run? (a local folder is never looked up on a model hub)"
        )
    check_finite_weights(weights)
    check_base_model(folder, model, allow_base_mismatch)
    return weights


def check_finite_weights(weights: Path) -> None:
    """Every tensor in the adapter weights file is finite (and the file is readable)."""
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(weights))
        else:
            tensors = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or corrupt file: any loader error means "unreadable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GastuneError(f"cannot read the adapter weights {weights}: {reason}") from None
    bad = {
        name: int((~torch.isfinite(t)).sum())
        for name, t in tensors.items()
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    }
    if bad:
        first = next(iter(bad))
        raise GastuneError(
            f"the adapter weights {weights} hold {sum(bad.values())} non-finite values in {len(bad)} "
            f"tensor(s) (e.g. {first}): the training diverged, so there is nothing to score"
        )


def recorded_base_models(folder: Path) -> list[str]:
    """The base model(s) the adapter records: gastune's ``--model`` and ``base_model`` record,
    and peft's ``base_model_name_or_path`` (the portable hub id for the embedded default)."""
    names: list[str] = []
    for file, read in (
        ("gastune_config.json", lambda d: [(d.get("model") or {}).get("model")]),
        (
            "gastune_config.json",
            lambda d: [(d.get("base_model") or {}).get(k) for k in ("name", "portable_name")],
        ),
        (ADAPTER_CONFIG, lambda d: [d.get("base_model_name_or_path")]),
    ):
        try:
            values = read(json.loads((folder / file).read_text()))
        except (OSError, ValueError, AttributeError):
            continue
        names += [v for v in values if isinstance(v, str) and v and v not in names]
    return names


def _local_path(name: str) -> Path | None:
    if name in (DEFAULT_MODEL, "default"):
        return default_model_target().resolve()
    path = Path(name).expanduser()
    return path.resolve() if path.exists() else None


def same_model(a: str, b: str) -> bool:
    """Whether two model names/paths name the same model (equal, or the same local folder)."""
    if a == b:
        return True
    pa, pb = _local_path(a), _local_path(b)
    return pa is not None and pa == pb


def check_base_model(folder: Path, model: str, allow_mismatch: bool = False) -> None:
    """``model`` must be a base model the adapter in ``folder`` records (see module doc)."""
    recorded = recorded_base_models(folder)
    if not recorded:
        logger.warning("%s records no base model; cannot check that '%s' is the right one", folder, model)
        return
    if any(same_model(model, name) for name in recorded):
        return
    if allow_mismatch:
        logger.warning("scoring %s, trained on '%s', on another base model '%s'", folder, recorded[0], model)
        return
    raise GastuneError(
        f"the adapter {folder} was trained on '{recorded[0]}', but --model is '{model}'; "
        f"use --model {recorded[0]}, or --allow-base-mismatch to score it on '{model}' anyway"
    )


def check_finite_parameters(model: torch.nn.Module, name: str) -> None:
    """Every parameter of the loaded model (base and adapter) is finite: a broken checkpoint
    would otherwise be scored (every protocol: NaN logits still pick some label or token)."""
    bad = [
        n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())
    ]
    if bad:
        raise GastuneError(
            f"the model '{name}' has non-finite weights in {len(bad)} tensor(s) (e.g. {bad[0]}): "
            "there is nothing honest to score"
        )

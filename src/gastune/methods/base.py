"""The method interface and registry; it imports no method (``gastune.methods`` registers them).

A method decides, every step, which samples update which layers. It is an object with
``setup(trainer, model)`` (once, after the Trainer has wrapped the model), ``training_step(trainer, model, inputs, run)`` (``run()`` performs the ordinary
forward + backward) and ``metrics()`` (scalars for the Trainer's log). New methods register a
factory in ``METHODS`` under the name ``--method`` takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gastune.errors import GastuneError

METHODS: dict[str, Callable[..., TrainingMethod]] = {}


def register_method(name: str):
    """Decorator: make a method factory ``f(config, **kwargs)`` available as ``--method name``."""

    def wrap(factory):
        METHODS[name] = factory
        return factory

    return wrap


class TrainingMethod:
    """Dense training: every sample updates every trainable parameter (the LoRA/DoRA baseline)."""

    name = "dense"

    def setup(self, trainer, model) -> None:
        pass

    def training_step(
        self, trainer, model, inputs: dict[str, Any], run: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        return run()

    def metrics(self) -> dict[str, float]:
        """Scalars accumulated since the last call (then reset)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def build_method(config, **kwargs) -> TrainingMethod:
    """The method named by ``config.method``, built from the config's settings."""
    try:
        factory = METHODS[config.method]
    except KeyError:
        raise GastuneError(
            f"unknown method '{config.method}'; choose one of {', '.join(sorted(METHODS))}"
        ) from None
    return factory(config, **kwargs)

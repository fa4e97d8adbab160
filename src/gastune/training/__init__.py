"""The Trainer side: configuration, the Trainer mixin, checkpoints, numerics, adapters and the
``train()`` entry point. What a step does (the methods) lives in ``gastune.methods``."""

from gastune.methods import METHODS, GastMethod, TrainingMethod, build_method, register_method
from gastune.training._moved import alias_moved_modules
from gastune.training.adapters import apply_adapter, build_peft_config
from gastune.training.config import DataConfig, GastuneConfig, ModelConfig
from gastune.training.trainer import GastuneMixin, GastuneTrainer

alias_moved_modules(__name__)

__all__ = [
    "METHODS",
    "DataConfig",
    "GastMethod",
    "GastuneConfig",
    "GastuneMixin",
    "GastuneTrainer",
    "ModelConfig",
    "TrainingMethod",
    "apply_adapter",
    "build_method",
    "build_peft_config",
    "register_method",
]

"""Trainer integration, configuration and the training entry point."""

from gastune.training.adapters import apply_adapter, build_peft_config
from gastune.training.config import DataConfig, GastuneConfig, ModelConfig
from gastune.training.methods import METHODS, GastMethod, TrainingMethod, build_method, register_method
from gastune.training.trainer import GastuneMixin, GastuneTrainer

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

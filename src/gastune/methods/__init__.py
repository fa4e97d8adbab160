"""Training methods: what a step does — which samples update which decoder layers.

Each module registers its methods under the names ``--method`` takes; importing this package
registers all of them (here, in one place). The Trainer side lives in ``gastune.training``.
"""

from gastune.methods import dataselect, dense, gast, gast_ist, ist, layerwise  # noqa: F401  (registers)
from gastune.methods.base import METHODS, TrainingMethod, build_method, register_method
from gastune.methods.dataselect import DataSelectMethod
from gastune.methods.gast import GastMethod
from gastune.methods.layerwise import LayerwiseMethod

__all__ = [
    "METHODS",
    "DataSelectMethod",
    "GastMethod",
    "LayerwiseMethod",
    "TrainingMethod",
    "build_method",
    "register_method",
]

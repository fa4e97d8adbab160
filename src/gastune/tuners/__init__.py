"""Tuners gastune implements itself (peft cannot register new ones): the Series and Parallel
bottleneck adapters of LLM-Adapters, with save, load and merge."""

from gastune.tuners.bottleneck import (
    ACTIVATIONS,
    BottleneckConfig,
    BottleneckLayer,
    bottleneck_layers,
    has_bottleneck,
)
from gastune.tuners.bottleneck_io import (
    is_bottleneck_folder,
    load_bottleneck,
    merge_bottleneck,
    save_bottleneck,
)
from gastune.tuners.placement import apply_bottleneck, default_targets

__all__ = [
    "ACTIVATIONS",
    "BottleneckConfig",
    "BottleneckLayer",
    "apply_bottleneck",
    "bottleneck_layers",
    "default_targets",
    "has_bottleneck",
    "is_bottleneck_folder",
    "load_bottleneck",
    "merge_bottleneck",
    "save_bottleneck",
]

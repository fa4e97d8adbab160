"""Old import paths of the modules that moved to ``gastune.methods`` in 0.2.0.

They keep working for one release (CHANGELOG.md): ``gastune.training.ist`` *is*
``gastune.methods.ist`` — the same module object, so attributes, monkeypatching and
``isinstance`` checks behave as before. They go in 0.3.0.
"""

from __future__ import annotations

import importlib
import sys

MOVED = {
    "methods": "gastune.methods",
    "dataselect": "gastune.methods.dataselect",
    "gast_ist": "gastune.methods.gast_ist",
    "ist": "gastune.methods.ist",
    "layerwise": "gastune.methods.layerwise",
    "persample": "gastune.methods.persample",
    "rows": "gastune.methods.rows",
}


def alias_moved_modules(package: str) -> None:
    """Make ``package.<old name>`` resolve to the module's new home."""
    parent = sys.modules[package]
    for old, new in MOVED.items():
        module = importlib.import_module(new)
        sys.modules.setdefault(f"{package}.{old}", module)
        setattr(parent, old, module)

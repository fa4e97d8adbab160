"""Run the committed experiment grid (a thin wrapper of ``gastune bench``).

Usage (flags as for ``gastune bench``; the grid defaults to benchmarks/commonsense_grid.yaml):
    python benchmarks/experiment.py                      # every missing run, then the report
    python benchmarks/experiment.py --max-runs 3         # a piece of the grid
    python benchmarks/experiment.py --report-only        # rebuild docs/experiment/ from results
"""

from __future__ import annotations

import sys
from pathlib import Path

from gastune.cli.main import main

GRID = Path(__file__).resolve().parent / "commonsense_grid.yaml"

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--config" not in argv:
        argv = ["--config", str(GRID), *argv]
    sys.exit(main(["bench", *argv]))

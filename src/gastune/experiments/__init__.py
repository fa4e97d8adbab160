"""Experiments: run a methods × seeds grid (one result file per run, resumable) and report it.

Example:
    >>> from gastune.experiments import build_report, load_grid, run_grid
    >>> grid = load_grid("benchmarks/commonsense_grid.yaml")  # doctest: +SKIP
    >>> run_grid(grid, max_runs=3)  # doctest: +SKIP
    >>> build_report(grid.results, grid.docs)  # doctest: +SKIP
"""

from gastune.experiments.grid import EvalSpec, Grid, MethodEntry, RunSpec, grid_from_dict, load_grid
from gastune.experiments.report import build_report
from gastune.experiments.runner import GridOutcome, run_grid, run_one
from gastune.experiments.summary import format_summary_table, load_runs, mean_std, summarize

__all__ = [
    "EvalSpec",
    "Grid",
    "GridOutcome",
    "MethodEntry",
    "RunSpec",
    "build_report",
    "format_summary_table",
    "grid_from_dict",
    "load_grid",
    "load_runs",
    "mean_std",
    "run_grid",
    "run_one",
    "summarize",
]

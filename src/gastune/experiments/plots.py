"""Figures of an experiment: train loss curves, accuracy bars, GAST's selection heatmap.

Each function draws on a ``Figure`` with an explicit Agg canvas (no pyplot: no global state,
no display needed) and writes a PNG.

Example:
    >>> plot_loss_curves(runs, "docs/experiment/loss_curves.png")  # doctest: +SKIP
    >>> plot_accuracy_bars(summarize(runs), "docs/experiment/accuracy.png")  # doctest: +SKIP
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gastune.errors import GastuneError
from gastune.eval.result import task_order


def _figure(size: tuple[float, float]):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise GastuneError("plotting needs matplotlib: pip install matplotlib (or gastune[plots])") from exc
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def loss_curve(runs: Sequence[dict[str, Any]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """``(steps, mean, low, high)`` of the logged train loss over the seeds of one method.

    Only steps logged by every seed are kept, so the mean is always over all of them.
    """
    curves = [{p["step"]: p["loss"] for p in r["train"]["loss_curve"]} for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    values = [[c[s] for c in curves] for s in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_loss_curves(
    runs: Sequence[dict[str, Any]], path: str | Path, order: Sequence[str] | None = None
) -> Path:
    """Train loss against step, one line per method (mean over seeds, band from min to max)."""
    by_name: dict[str, list[dict]] = {}
    for run in runs:
        by_name.setdefault(run["name"], []).append(run)
    if not by_name:
        raise GastuneError("no runs to plot")
    from matplotlib.ticker import MaxNLocator

    fig = _figure((7.0, 4.5))
    ax = fig.add_subplot()
    for name in [n for n in (order or []) if n in by_name] + sorted(set(by_name) - set(order or [])):
        steps, mean, low, high = loss_curve(by_name[name])
        if not steps:
            continue
        (line,) = ax.plot(steps, mean, label=f"{name} ({len(by_name[name])} seeds)", linewidth=1.5)
        if len(by_name[name]) > 1:
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (mean per sample)")
    ax.set_title("Train loss: mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy_bars(summary: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars of accuracy per task and on average, one bar per method, ±1 std error bars."""
    if not summary:
        raise GastuneError("no results to plot")
    tasks = [*task_order({t for s in summary.values() for t in s["tasks"]}), "average"]
    fig = _figure((max(7.0, 1.1 * len(tasks) + 2), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / len(summary)
    for k, (name, s) in enumerate(summary.items()):
        stats = [s["average"] if t == "average" else s["tasks"].get(t) for t in tasks]
        xs = [i + (k - (len(summary) - 1) / 2) * width for i in range(len(tasks))]
        heights = [100 * st["mean"] if st else 0.0 for st in stats]
        errors = [100 * st["std"] if st and st["std"] is not None else 0.0 for st in stats]
        ax.bar(xs, heights, width, yerr=errors, capsize=2, label=f"{name} ({len(s['seeds'])})")
    ax.set_xticks(range(len(tasks)), labels=tasks, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Validation accuracy: mean over seeds, error bars = 1 std")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(4, len(summary)))
    return _save(fig, path)


def pick_selection_run(runs: Sequence[dict[str, Any]], prefer: str = "gast") -> dict[str, Any] | None:
    """The run whose selection to draw: ``prefer`` (lowest seed) if it has one, else the first."""
    with_selection = [r for r in runs if r.get("selection")]
    preferred = [r for r in with_selection if r["name"] == prefer]
    candidates = sorted(preferred or with_selection, key=lambda r: (r["name"], r["seed"]))
    return candidates[0] if candidates else None


def plot_selection(run: dict[str, Any], path: str | Path) -> Path:
    """GAST's data × layer selection frequency of one run, via ``viz.plot_selection_heatmap``."""
    import torch

    from gastune.viz import plot_selection_heatmap

    selection = run["selection"]
    groups = selection.get("groups")
    frequency = torch.tensor(selection["frequency"], dtype=torch.float64)
    title = (
        f"{run['name']} seed {run['seed']}: selection frequency\n"
        f"{selection['masks']} micro-batches, steps {selection['first_step']}-{selection['last_step']}"
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    names = (
        [g.rsplit("layers.", 1)[-1] for g in groups] if groups and len(groups) == frequency.shape[1] else None
    )
    return plot_selection_heatmap(frequency, path, title=title, group_names=names)

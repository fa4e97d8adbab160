"""Train loss against optimizer step and against wall-clock time, one line per method.

A method that costs more per step (GAST's support pass, IST's probes) can look better per
step and worse per second; both panels come from the same run files: the logged loss curve
and the measured time of every optimizer step (``train.step_times_s``), whose cumulative sum
places each logged step on the clock.

Example:
    >>> plot_loss_step_and_time(load_runs("docs/evidence-a/results"), "docs/evidence-a/loss_step_time.png")  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gastune.errors import GastuneError
from gastune.experiments.plots import _figure, _save, loss_curve


def elapsed_at(run: dict[str, Any], steps: Sequence[int]) -> list[float] | None:
    """Seconds of training from its start to the end of each of ``steps`` (None if not timed)."""
    times = run["train"].get("step_times_s") or []
    if not steps or len(times) < max(steps):
        return None
    clock = list(itertools.accumulate(times))
    return [clock[s - 1] for s in steps]


def time_curve(runs: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]] | None:
    """``(seconds, mean loss)`` over the seeds of one method: both averaged step by step."""
    steps, mean, _, _ = loss_curve(runs)
    clocks = [elapsed_at(r, steps) for r in runs]
    if not steps or any(c is None for c in clocks):
        return None
    return [statistics.fmean(c[i] for c in clocks) for i in range(len(steps))], mean


def plot_loss_step_and_time(
    runs: Sequence[dict[str, Any]], path: str | Path, order: Sequence[str] | None = None, title: str = ""
) -> Path:
    """Two panels: mean train loss over seeds against step, and against elapsed seconds."""
    by_name: dict[str, list[dict]] = {}
    for run in runs:
        by_name.setdefault(run["name"], []).append(run)
    if not by_name:
        raise GastuneError("no runs to plot")
    fig = _figure((12.0, 4.5))
    by_step, by_time = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name in [n for n in (order or []) if n in by_name] + sorted(set(by_name) - set(order or [])):
        steps, mean, _, _ = loss_curve(by_name[name])
        if not steps:
            continue
        label = f"{name} ({len(by_name[name])} seeds)"
        (line,) = by_step.plot(steps, mean, label=label, linewidth=1.3)
        timed = time_curve(by_name[name])
        if timed is not None:
            by_time.plot(timed[0], timed[1], label=label, linewidth=1.3, color=line.get_color())
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("training wall-clock (s, mean over seeds)")
    for ax in (by_step, by_time):
        ax.set_ylabel("train loss (mean over seeds)")
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)

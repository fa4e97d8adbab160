"""Results tables and the results JSON (with the run's provenance: git, date, machine).

Example:
    >>> print(format_results_table(result))  # doctest: +SKIP
    | task     |  n | accuracy |
    |----------|----|----------|
    | arc_easy | 20 |    0.450 |
    | average  |    |    0.450 |
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from gastune.errors import GastuneError
from gastune.eval.result import EvalResult, task_order
from gastune.provenance import git_info, machine_info, write_json  # noqa: F401  (re-exported)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def format_results_table(result: EvalResult) -> str:
    """``task | n | accuracy`` per task, then the unweighted average over the tasks.

    Example:
        >>> print(format_results_table(result))  # doctest: +SKIP
    """
    rows = [[t, str(s.n), f"{s.accuracy:.3f}"] for t, s in result.tasks.items()]
    rows.append(["average", "", f"{result.average:.3f}"])
    return _table(["task", "n", "accuracy"], rows)


def format_comparison_table(
    before: EvalResult, after: EvalResult, names: tuple[str, str] = ("before", "after")
) -> str:
    """Side-by-side accuracies of two results per task, with the change (after - before).

    A task missing from one side shows ``-``; the average row is each result's own average.

    Example:
        >>> print(format_comparison_table(base, tuned, names=("base", "lora")))  # doctest: +SKIP
    """
    rows = []
    for task in task_order(set(before.tasks) | set(after.tasks)):
        a, b = before.tasks.get(task), after.tasks.get(task)
        n = {x.n for x in (a, b) if x is not None}
        rows.append(
            [
                task,
                "/".join(str(x) for x in sorted(n)),  # "n" or "n_a/n_b" when the sides differ
                f"{a.accuracy:.3f}" if a else "-",
                f"{b.accuracy:.3f}" if b else "-",
                f"{b.accuracy - a.accuracy:+.3f}" if a and b else "-",
            ]
        )
    rows.append(
        [
            "average",
            "",
            f"{before.average:.3f}",
            f"{after.average:.3f}",
            f"{after.average - before.average:+.3f}",
        ]
    )
    return _table(["task", "n", names[0], names[1], "change"], rows)


def results_document(
    result: EvalResult,
    model: str,
    adapter: str | None = None,
    settings: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """The results JSON's content: provenance, ``settings`` (split, tasks, ...) and ``results``."""
    return {
        "model": model,
        "adapter": adapter,
        "git": git_info(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "settings": dict(settings or {}),
        "results": result.to_dict(),
    }


def read_results(path: str | Path) -> EvalResult:
    """The ``EvalResult`` stored in a results JSON written by ``write_json``."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise GastuneError(f"cannot read results from '{path}': {exc}") from exc
    if not isinstance(document, dict):
        raise GastuneError(f"'{path}' does not hold an evaluation result")
    return EvalResult.from_dict(document.get("results", document))

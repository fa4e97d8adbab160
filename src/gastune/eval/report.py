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
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from gastune.errors import GastuneError
from gastune.eval.result import EvalResult, task_order


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


def git_info(path: str | Path | None = None) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the git checkout holding ``path`` (default: this package).

    Both are ``None`` outside a checkout or without git.
    """
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Where the numbers were measured: platform, CPU count, torch version, device."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }


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


def write_json(path: str | Path, document: dict[str, Any]) -> Path:
    """Write JSON atomically: a temporary file in the same folder, then a rename.

    An interrupted run therefore never leaves a truncated results file behind.

    Example:
        >>> write_json("results.json", results_document(result, model="smollm2-135m"))  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_results(path: str | Path) -> EvalResult:
    """The ``EvalResult`` stored in a results JSON written by ``write_json``."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise GastuneError(f"cannot read results from '{path}': {exc}") from exc
    if not isinstance(document, dict):
        raise GastuneError(f"'{path}' does not hold an evaluation result")
    return EvalResult.from_dict(document.get("results", document))

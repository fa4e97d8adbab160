"""Aggregate run result files: accuracy mean ± std over seeds, cost as ratios to LoRA.

Pure data: ``load_runs`` reads whatever result files exist, ``summarize`` groups them by
method entry name, and ``format_summary_table`` renders the markdown table. The std is the
sample standard deviation over seeds (n - 1 in the denominator); with one seed it is
``None`` and the table shows the mean alone.

Example:
    >>> summary = summarize(load_runs("docs/experiment/results"))  # doctest: +SKIP
    >>> print(format_summary_table(summary))  # doctest: +SKIP
    | method | seeds | boolq      | ... | average    | s/step | × LoRA | peak GiB | × LoRA |
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gastune.errors import GastuneError
from gastune.eval.result import task_order
from gastune.experiments.runner import RESULT_KIND

logger = logging.getLogger(__name__)

REFERENCE = "lora"  # cost ratios are taken against this entry


def load_runs(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every run result document in ``results_dir`` (other JSON files are ignored), by name and seed."""
    folder = Path(results_dir)
    if not folder.is_dir():
        raise GastuneError(f"no results folder '{folder}'")
    runs = []
    for path in sorted(folder.glob("*.json")):
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("skipping unreadable %s: %s", path, exc)
            continue
        if isinstance(document, dict) and document.get("kind") == RESULT_KIND:
            runs.append(document)
    return sorted(runs, key=lambda r: (r["name"], r["seed"]))


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "n"}``; ``std`` is the sample std, ``None`` for a single value.

    Example:
        >>> mean_std([1.0, 2.0, 3.0])
        {'mean': 2.0, 'std': 1.0, 'n': 3}
    """
    values = list(values)
    if not values:
        raise GastuneError("no values to average")
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def _ordered(names: set[str], order: Sequence[str] | None) -> list[str]:
    order = list(order or [])
    first = [n for n in order if n in names]
    rest = sorted(n for n in names if n not in first)
    if REFERENCE in rest:  # the reference leads when no order is given
        rest.remove(REFERENCE)
        rest.insert(0, REFERENCE)
    return first + rest


def summarize(
    runs: Sequence[dict[str, Any]], order: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Per method entry: seeds, per-task and average accuracy (mean/std), cost and its ratios.

    Cost is the mean over seeds of seconds per optimizer step and of peak memory (CUDA peak
    when measured, else peak RSS); ratios divide by the ``lora`` entry's means (``None``
    without a LoRA result).
    """
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["name"], []).append(run)
    summary: dict[str, dict[str, Any]] = {}
    for name in _ordered(set(groups), order):
        members = groups[name]
        results = [m["eval"]["results"] for m in members]
        tasks = task_order({t for r in results for t in r["tasks"]})
        train = [m["train"] for m in members]
        memory = [t.get("peak_cuda_bytes") or t.get("peak_rss_bytes") for t in train]
        losses = [t["train_loss"] for t in train if t.get("train_loss") is not None]
        # The held-out NLL of the gold response (run files from before it was measured lack it).
        nlls = [m["eval"]["nll"]["mean"] for m in members if m["eval"].get("nll")]
        summary[name] = {
            "method": members[0]["method"],
            "seeds": [m["seed"] for m in members],
            "tasks": {
                t: mean_std([r["tasks"][t]["accuracy"] for r in results if t in r["tasks"]]) for t in tasks
            },
            "average": mean_std([r["average"] for r in results]),
            "seconds_per_step": statistics.fmean(t["seconds_per_step"] for t in train),
            "peak_memory_bytes": statistics.fmean(memory) if all(memory) else None,
            "train_loss": mean_std(losses) if losses else None,
            "nll": mean_std(nlls) if len(nlls) == len(members) else None,
        }
    ref = summary.get(REFERENCE)
    for entry in summary.values():
        entry["time_ratio"] = entry["seconds_per_step"] / ref["seconds_per_step"] if ref else None
        both = ref and entry["peak_memory_bytes"] and ref["peak_memory_bytes"]
        entry["memory_ratio"] = entry["peak_memory_bytes"] / ref["peak_memory_bytes"] if both else None
    return summary


def _pct(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "-"
    text = f"{100 * stat['mean']:.1f}"
    return text if stat["std"] is None else f"{text} ± {100 * stat['std']:.1f}"


def _nll(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "-"
    text = f"{stat['mean']:.4f}"
    return text if stat["std"] is None else f"{text} ± {stat['std']:.4f}"


def format_summary_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown: held-out NLL of the gold response (when measured), accuracy % per task and on
    average (mean ± std over seeds), then the cost.

    Example:
        >>> print(format_summary_table(summarize(runs)))  # doctest: +SKIP
    """
    if not summary:
        raise GastuneError("no results to tabulate")
    tasks = task_order({t for s in summary.values() for t in s["tasks"]})
    # The NLL column appears once any method has it (older grids' tables stay as they were).
    with_nll = any(s.get("nll") for s in summary.values())
    header = ["method", "seeds", *(["NLL"] if with_nll else []), *tasks, "average"]
    header += ["s/step", "× LoRA", "peak GiB", "× LoRA"]
    rows = []
    for name, s in summary.items():
        memory = s["peak_memory_bytes"]
        rows.append(
            [
                name,
                str(len(s["seeds"])),
                *([_nll(s.get("nll"))] if with_nll else []),
                *(_pct(s["tasks"].get(t)) for t in tasks),
                _pct(s["average"]),
                f"{s['seconds_per_step']:.2f}",
                "-" if s["time_ratio"] is None else f"{s['time_ratio']:.2f}",
                "-" if memory is None else f"{memory / 2**30:.2f}",
                "-" if s["memory_ratio"] is None else f"{s['memory_ratio']:.2f}",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    rule = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


# The paper's claims, as (better, worse) entry names: GAST > IST > LoRA; softmax > random > top-K.
PAPER_ORDERINGS: tuple[tuple[str, str], ...] = (
    ("gast", "ist"),
    ("ist", "lora"),
    ("gast", "lora"),
    ("gast", "gast-random"),
    ("gast-random", "gast-topk"),
)


def paired_differences(
    runs: Sequence[dict[str, Any]], pairs: Sequence[tuple[str, str]] = PAPER_ORDERINGS
) -> list[dict[str, Any]]:
    """Per pair ``(a, b)`` present in ``runs``: average accuracy of a minus b, seed by seed.

    Methods of one grid share the seed's data order, so the per-seed difference removes the
    variation both runs of a seed share. Returns ``{"a", "b", "seeds", "differences",
    "mean", "std", "wins"}`` (``wins``: seeds where a scored higher); pairs without a common
    seed are left out.

    Example:
        >>> runs = [{"name": n, "seed": s, "eval": {"results": {"average": v}}}
        ...         for n, s, v in [("gast", 0, 0.5), ("lora", 0, 0.4), ("gast", 1, 0.5), ("lora", 1, 0.6)]]
        >>> [round(x, 3) for x in paired_differences(runs, [("gast", "lora")])[0]["differences"]]
        [0.1, -0.1]
    """
    average = {(r["name"], r["seed"]): r["eval"]["results"]["average"] for r in runs}
    out = []
    for a, b in pairs:
        seeds = sorted(s for (name, s) in average if name == a and (b, s) in average)
        if not seeds:
            continue
        diffs = [average[(a, s)] - average[(b, s)] for s in seeds]
        stats = mean_std(diffs)
        out.append(
            {
                "a": a,
                "b": b,
                "seeds": seeds,
                "differences": diffs,
                "mean": stats["mean"],
                "std": stats["std"],
                "wins": sum(d > 0 for d in diffs),
            }
        )
    return out


def format_paired_table(pairs: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per ordering, the per-seed differences in accuracy points."""
    lines = [
        "| ordering | seeds | a − b per seed (points) | mean ± std | a ahead in |",
        "|---|---:|---|---|---|",
    ]
    for p in pairs:
        per_seed = ", ".join(f"{100 * d:+.1f}" for d in p["differences"])
        spread = "" if p["std"] is None else f" ± {100 * p['std']:.1f}"
        lines.append(
            f"| {p['a']} > {p['b']} | {len(p['seeds'])} | {per_seed} | {100 * p['mean']:+.1f}{spread} "
            f"| {p['wins']} of {len(p['seeds'])} |"
        )
    return "\n".join(lines)

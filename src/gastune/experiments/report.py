"""Build an experiment's table, summary JSON and figures from whatever run results exist.

Writes into the docs folder: ``table.md`` (settings, then accuracy mean ± std per task and on
average, time per step and peak memory as ratios to LoRA), ``summary.json`` (the same
numbers, with provenance), ``loss_curves.png``, ``accuracy.png`` and, when a GAST run kept
its selection, ``selection_heatmap.png``. Rebuilding is cheap and idempotent, so it runs after
every piece of a grid and on its own (``gastune bench --report-only``).

Example:
    >>> paths = build_report("docs/experiment/results", "docs/experiment")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gastune.errors import GastuneError
from gastune.experiments.paired import format_comparisons, paired_comparison
from gastune.experiments.plots import pick_selection_run, plot_accuracy_bars, plot_loss_curves, plot_selection
from gastune.experiments.summary import (
    PAPER_ORDERINGS,
    format_paired_table,
    format_summary_table,
    load_runs,
    paired_differences,
    summarize,
)
from gastune.provenance import provenance, write_json

logger = logging.getLogger(__name__)

# Settings shown in the table's caption when every run shares them.
_CAPTION_KEYS = (
    "model",
    "data",
    "per_task",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lora_r",
    "cutoff_len",
    "prompt_format",
    "train_on_prompt",
)


def _shared(values: list[Any]) -> str:
    distinct = {repr(v) for v in values}
    return str(values[0]) if len(distinct) == 1 else "mixed: " + ", ".join(sorted(distinct))


def describe(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Caption lines: shared training settings, the evaluation sample, commits, machines, dates."""
    settings = [r["settings"] for r in runs]
    shared = ", ".join(
        f"{k} {_shared([s.get(k) for s in settings])}" for k in _CAPTION_KEYS if any(k in s for s in settings)
    )
    ev = runs[0]["eval"]["settings"]
    source = (
        f"{ev['split']} split, {ev['per_task']} per task, sample seed {ev['seed']}"
        if ev["data"] == "commonsense"
        else ev["data"]
    )
    protocol = ev["protocol"] + (
        f", {ev['num_beams']} beam(s)"
        if ev["protocol"] == "generate"
        else f", format {ev.get('format', 'mc')}, rule {ev.get('rule', 'sum')}"
    )
    evaluation = f"{ev['n']} questions ({source}), protocol {protocol}"
    if len({repr(r["eval"]["settings"]) for r in runs}) > 1:
        evaluation += " — WARNING: runs were scored on different samples or protocols"
    commits = sorted({(r["git"]["commit"] or "unknown")[:8] + _dirty_note(r["git"]) for r in runs})
    machines = sorted({r["machine"]["device_name"] for r in runs})
    dates = sorted(r["date"][:10] for r in runs)
    return [
        f"Training: {shared}.",
        f"Evaluation: {evaluation}.",
        f"Runs: {len(runs)}, {dates[0]} to {dates[-1]}, commits {', '.join(commits)}, on {', '.join(machines)}.",
    ]


def _dirty_note(git: dict[str, Any]) -> str:
    """ " (dirty)", or " (dirty: docs only)" where the run file lists its changed files and none is code."""
    if not git.get("dirty"):
        return ""
    changed = git.get("changed")
    return " (dirty: docs only)" if changed and all(p.startswith("docs/") for p in changed) else " (dirty)"


def bootstrap_comparisons(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's orderings as paired bootstrap comparisons, on NLL then accuracy, where measured."""
    if not any(r["eval"].get("nll") for r in runs):
        return []  # a grid from before NLL was measured: its report stays as it was
    pairs = [(a, b, metric) for metric in ("nll", "accuracy") for a, b in PAPER_ORDERINGS]
    return [c for c in (paired_comparison(runs, a, b, m) for a, b, m in pairs) if c is not None]


def build_report(
    results_dir: str | Path, docs_dir: str | Path, order: Sequence[str] | None = None
) -> dict[str, Path]:
    """Write the table, summary and figures for the runs in ``results_dir``; return the paths."""
    runs = load_runs(results_dir)
    if not runs:
        raise GastuneError(f"no run results in '{results_dir}' yet")
    docs = Path(docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs, order=order)
    order = list(summary)
    table = format_summary_table(summary)
    paths = {
        "loss_curves": plot_loss_curves(runs, docs / "loss_curves.png", order=order),
        "accuracy": plot_accuracy_bars(summary, docs / "accuracy.png"),
    }
    chosen = pick_selection_run(runs)
    if chosen is not None:
        paths["selection_heatmap"] = plot_selection(chosen, docs / "selection_heatmap.png")
    caption = describe(runs)
    pairs = paired_differences(runs)
    comparisons = bootstrap_comparisons(runs)
    figures = [f"![{name}]({path.name})" for name, path in paths.items()]
    text = "\n\n".join(
        [
            "Accuracy in % (mean ± sample std over seeds); time per optimizer step and peak memory "
            "(CUDA memory allocated where measured, else the process's resident set) are means over "
            "seeds, with their ratios to LoRA.",
            "\n".join(f"- {line}" for line in caption),
            table,
            *(
                [
                    "The paper's orderings, seed by seed (average accuracy of a minus b on the same "
                    "seed; methods of one seed share its data order):",
                    format_paired_table(pairs),
                ]
                if pairs
                else []
            ),
            *(
                [
                    "Paired differences question by question (held-out NLL of the gold response in "
                    "nats per token, lower is better; accuracy in points), with bootstrap 95% intervals "
                    "over questions and seeds; resolved = the interval excludes 0:",
                    format_comparisons(comparisons),
                ]
                if comparisons
                else []
            ),
            "\n".join(figures),
        ]
    )
    paths["table"] = docs / "table.md"
    paths["table"].write_text(text + "\n")
    document = {
        "runs": [f"{r['name']}-seed{r['seed']}" for r in runs],
        "caption": caption,
        "summary": summary,
        "orderings": pairs,
        "comparisons": comparisons,
    }
    paths["summary"] = write_json(docs / "summary.json", {**document, "report": provenance()})
    logger.info("report of %d runs written to %s", len(runs), docs)
    return paths

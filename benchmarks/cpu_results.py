"""The CPU-sized grid's section of docs/RESULTS.md (benchmarks/commonsense_grid_cpu.yaml).

That grid ran before the held-out NLL was measured: its section keeps what it showed (the
table, the base model, the paper's orderings seed by seed, with a mechanical verdict: "holds"
when the first method scored higher on every seed, "reversed" when lower on every seed,
otherwise "not resolved"). benchmarks/write_results.py puts it after Experiments A and B.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gastune.eval.result import task_order
from gastune.experiments.grid import load_grid
from gastune.experiments.report import describe
from gastune.experiments.summary import (
    format_paired_table,
    format_summary_table,
    load_runs,
    paired_differences,
    summarize,
)


def verdict(pair: dict) -> str:
    n = len(pair["seeds"])
    if pair["wins"] == n and pair["mean"] > 0:
        return "holds"
    if all(d < 0 for d in pair["differences"]):
        return "reversed"
    return "not resolved"


def base_row(doc: dict, path: Path, tasks: list[str]) -> str:
    res = doc["results"]
    cells = [f"{100 * res['tasks'][t]['accuracy']:.1f}" if t in res["tasks"] else "-" for t in tasks]
    commit = (doc.get("git") or {}).get("commit") or "unknown"
    dirty = " (dirty)" if (doc.get("git") or {}).get("dirty") else ""
    return (
        "| task | " + " | ".join(tasks) + " | average |\n|---|" + "---:|" * (len(tasks) + 1) + "\n"
        f"| before training | {' | '.join(cells)} | {100 * res['average']:.1f} |\n\n"
        f"(`{path}`, commit {commit[:8]}{dirty}, {doc.get('date', '')[:10]})"
    )


def training_effect(summary: dict, base_doc: dict) -> str:
    """Did training help at all, and how much of it is BoolQ (whose answer is mostly a prior)?"""
    base = base_doc["results"]
    above = [n for n, s in summary.items() if s["average"]["mean"] > base["average"]]
    text = (
        f"Training itself helped: the base model averages {100 * base['average']:.1f}; "
        f"{len(above)} of {len(summary)} methods end above it on average over their seeds."
    )
    if "lora" in summary and "boolq" in base["tasks"]:
        lora = summary["lora"]
        gain = lora["average"]["mean"] - base["average"]
        boolq = lora["tasks"]["boolq"]["mean"] - base["tasks"]["boolq"]["accuracy"]
        text += (
            f" For LoRA, BoolQ moves {100 * base['tasks']['boolq']['accuracy']:.1f} → "
            f"{100 * lora['tasks']['boolq']['mean']:.1f}, i.e. {100 * boolq / 8:.1f} of its "
            f"{100 * gain:.1f}-point average gain. BoolQ records carry the question without its passage "
            "(the LLM-Adapters format), so that gain is mostly the answer prior (about 62% of BoolQ "
            "questions are true, checked in tests/unit/test_data_commonsense.py), not reading."
        )
    return text


def cpu_section(grid_path: str, base_path: str, page: Path) -> list[str]:
    """The section's lines (headings one level below the page's title)."""
    grid = load_grid(grid_path)
    base_doc = json.loads(Path(base_path).read_text())
    runs = load_runs(grid.results)
    summary = summarize(runs, order=[entry.name for entry in grid.methods])
    pairs = paired_differences(runs)
    tasks = task_order({t for s in summary.values() for t in s["tasks"]})
    expected = {(run.name, run.seed) for run in grid.runs()}
    missing = sorted(expected - {(r["name"], r["seed"]) for r in runs})
    lora_std = summary["lora"]["average"]["std"] if "lora" in summary else None
    lora_seeds = [r["eval"]["results"]["average"] for r in runs if r["name"] == "lora"]

    docs = os.path.relpath(grid.docs, page.parent).replace(os.sep, "/")
    lines = [
        "## The CPU-sized grid: every method side by side on SmolLM2-135M (CPU budget)",
        "",
        f"From the run files in `{grid.results}` (grid: `{grid_path}`, run with `gastune bench`; see "
        "docs/experiments.md). This grid ran before the held-out NLL was measured: its verdicts are "
        "per-seed signs of accuracy differences, superseded by Experiments A and B above once they run.",
        "",
        "### What was run",
        "",
        *(f"- {line}" for line in describe(runs)),
        "- Methods: lora, dora (dense); rst, ist (25% of layers per step, random / learnt); gast "
        "(softmax selection, k = 4 of 8 samples per layer, 2 support samples) and its ablations "
        "gast-random and gast-topk. Same data, data order per seed, budget and evaluation for all.",
        "- No GPU was lent to this project, so the larger-budget repeat the issue asks for where a "
        "GPU is available was not run; the full-budget grid is `benchmarks/commonsense_grid.yaml`.",
        *(
            [f"- MISSING runs (not finished): {', '.join(f'{m}-seed{s}' for m, s in missing)}."]
            if missing
            else []
        ),
        "",
        "### Accuracy and cost",
        "",
        "Accuracy in % on 320 validation questions (40 per task), mean ± sample std over seeds:",
        "",
        format_summary_table(summary),
        "",
        "The base model on the same questions (no training):",
        "",
        base_row(base_doc, Path(base_path), tasks),
        "",
        "Cost columns: seconds per optimizer step and peak resident memory, with ratios to LoRA. The two "
        "grid processes ran side by side (one per core) and, for part of the time, beside other jobs, so "
        "these ratios are indicative only; the controlled side-by-side cost measurement is "
        "`benchmarks/step_cost.py` (README: GAST ×1.29 time, ×1.01 memory at 16×256).",
        "",
        "### Do the paper's orderings hold at this scale?",
        "",
        format_paired_table(pairs),
        "",
    ]
    for p in pairs:
        spread = "" if p["std"] is None else f" ± {100 * p['std']:.1f}"
        lines.append(
            f"- **{p['a']} > {p['b']}: {verdict(p)}** — {p['a']} ahead on {p['wins']} of "
            f"{len(p['seeds'])} seeds, {100 * p['mean']:+.1f}{spread} points on average."
        )
    lines += [
        "",
        "How big a difference is noise here: one question is 2.5 points of a task and 0.31 points of the "
        "8-task average; LoRA's own average moves by "
        + (
            f"{100 * (max(lora_seeds) - min(lora_seeds)):.1f} points across its seeds (std "
            f"{100 * lora_std:.1f})"
            if lora_std is not None
            else "an unknown amount (fewer than two seeds)"
        )
        + ". With three seeds, a paired difference that keeps its sign on every seed is the most this grid "
        "can show; it is not significance at any conventional level.",
        "",
        training_effect(summary, base_doc),
        "",
        "Plainly: at 135M parameters, 32 steps of 8 and 320 evaluation questions, the per-seed verdicts are "
        + "; ".join(f"{p['a']} > {p['b']}: {verdict(p)}" for p in pairs)
        + ". Even a difference that keeps its sign on 3 of 3 seeds arises by chance one time in eight when "
        "two methods are equal, so none of the paper's orderings (measured on 7–8B models with 170k "
        "training examples) is established or refuted by this grid.",
        "",
        "Figures (from the same run files, `gastune bench --config "
        f"{grid_path} --report-only`): "
        f"[loss curves]({docs}/loss_curves.png), [accuracy]({docs}/accuracy.png), "
        f"[GAST selection heatmap]({docs}/selection_heatmap.png); table and summary JSON: "
        f"[{docs}/table.md]({docs}/table.md).",
        "",
    ]
    return lines

"""Estimate the CPU time of Experiments A and B from measured run files, and of the plan that fits.

Per-step cost is measured, not guessed, where a measurement exists: the committed CPU grid
(docs/experiment-cpu/results: the same model, batch of 8, rc format, cutoff, LoRA rank and
GAST k as Experiments A and B, single-threaded, two processes side by side) gives each
method's mean seconds per optimizer step and the evaluation's seconds per question. The pilot
(docs/evidence-pilot/results: a few steps of A's settings, ``gastune bench --set max_steps=8``)
gives what the CPU grid cannot: the cost of the held-out NLL pass relative to the option
ranking, and GAST with ``--gast_support batch`` relative to GAST. Entries with neither are
costed by an analogue, named in the output. Pilot times were taken on a loaded machine, so
only their ratios are used.

    python benchmarks/evidence_budget.py            # markdown tables for docs/experiments.md
"""

from __future__ import annotations

import argparse
import statistics

from gastune.experiments.grid import load_grid
from gastune.experiments.summary import load_runs

# Entries without their own CPU-grid measurement, and the measured entry that stands in.
ANALOGUES = {
    "lora-lr3e-4": "lora",
    "gast-lr3e-4": "gast",
    "gast-heldout": "gast",  # the same support pass, from another set
    "greats": "gast",  # assumption: per-sample gradient scoring costs about GAST's support pass
    "maxloss": "lora",  # assumption: a no-grad forward of 8 + a step on 4 ≈ a LoRA step of 8
    "random-half": "lora",  # upper bound: it trains on half of each batch
}
# Tier 1 fits 8 hours of the 2-core machine (two single-threaded processes): the comparisons
# behind questions (i) at one learning rate, (ii), (iv) and the core of (v). Tier 2 is the rest
# of both grids (the learning-rate check, the selection ablations (iii), rst, and B's
# data-selection baselines), for later sittings; the runner resumes either way.
TIER1 = {
    "A": {"lora": 5, "gast": 5, "ist": 5, "gast-batch": 5},
    "B": {"lora": 3, "gast": 3, "gast-heldout": 3},
}


def _mean(runs, name, key):
    values = [r["train"][key] if key in r["train"] else r["eval"][key] for r in runs if r["name"] == name]
    return statistics.fmean(values) if values else None


def costs(cpu_dir: str, pilot_dir: str) -> tuple[dict[str, float], float, float, dict]:
    """Per-entry seconds per step, eval seconds per question, the NLL share, pilot facts."""
    cpu, pilot = load_runs(cpu_dir), load_runs(pilot_dir)
    step = {n: _mean(cpu, n, "seconds_per_step") for n in {r["name"] for r in cpu}}
    per_question = statistics.fmean(r["eval"]["seconds"] / r["eval"]["settings"]["n"] for r in cpu)
    timed = [r for r in pilot if r["eval"].get("nll_seconds")]
    nll_share = statistics.fmean(r["eval"]["nll_seconds"] / r["eval"]["seconds"] for r in timed)
    # gast and gast-batch ran back to back in the pilot, under the same (heavy) load; lora ran
    # earlier under a lighter one, so the ratio to gast is the less distorted of the two.
    ratio = _mean(pilot, "gast-batch", "seconds_per_step") / _mean(pilot, "gast", "seconds_per_step")
    step["gast-batch"] = step["gast"] * ratio
    facts = {
        "pilot": {f"{r['name']}": round(r["train"]["seconds_per_step"], 1) for r in pilot},
        "gast-batch/gast": ratio,
    }
    return step, per_question, nll_share, facts


def estimate(grid_path: str, step: dict, per_question: float, nll_share: float, seeds: dict[str, int]):
    """Markdown rows (entry, cost source, s/step, minutes per run, seeds, core-hours) and the total."""
    grid = load_grid(grid_path)
    t = grid.train
    steps = t["per_task"] * 8 // (t["per_device_train_batch_size"] * t.get("gradient_accumulation_steps", 1))
    questions = grid.eval.per_task * 8
    eval_s = questions * per_question * (1 + nll_share)
    rows, total = [], 0.0
    for entry in grid.methods:
        source = entry.name if entry.name in step else ANALOGUES[entry.name]
        how = (
            "gast × pilot ratio"
            if entry.name == "gast-batch"
            else "measured"
            if source == entry.name
            else source
        )
        n = seeds[entry.name]
        run_s = steps * step[source] + eval_s
        total += n * run_s
        rows.append(
            f"| {entry.name} | {how} | {step[source]:.1f} | "
            f"{steps * step[source] / 60:.0f} | {eval_s / 60:.1f} | {n} | {n * run_s / 3600:.2f} |"
        )
    head = [
        f"{grid_path}: {steps} steps of {t['per_device_train_batch_size']}, {questions} questions",
        "",
        "| entry | cost from | s/step | train min/run | eval min/run | seeds | core-hours |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    return [*head, *rows, f"| **total** | | | | | | **{total / 3600:.1f}** |"], total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-results", default="docs/experiment-cpu/results")
    ap.add_argument("--pilot", default="docs/evidence-pilot/results")
    args = ap.parse_args()
    step, per_question, nll_share, facts = costs(args.cpu_results, args.pilot)
    print(
        f"eval: {per_question:.3f} s per question (option ranking, CPU grid) × (1 + {nll_share:.2f} for the NLL "
        f"pass, pilot); gast-batch = gast × {facts['gast-batch/gast']:.2f} (pilot); pilot s/step (loaded "
        f"machine): {facts['pilot']}\n"
    )
    grand = {}
    plans = (("full grids", None), ("tier 1 (the 8-hour plan)", TIER1), ("tier 2 (the rest)", "rest"))
    for label, plan in plans:
        print(f"## {label}\n")
        grand[label] = 0.0
        for key, path in (("A", "benchmarks/evidence_a.yaml"), ("B", "benchmarks/evidence_b.yaml")):
            grid = load_grid(path)
            seeds = {m.name: len(grid.seeds) for m in grid.methods}
            if plan == "rest":
                seeds = {n: k - TIER1[key].get(n, 0) for n, k in seeds.items()}
            elif plan is not None:
                seeds = {n: TIER1[key].get(n, 0) for n in seeds}
            lines, total = estimate(path, step, per_question, nll_share, seeds)
            grand[label] += total
            print("\n".join(lines) + "\n")
        hours = grand[label] / 3600
        print(
            f"{label}: {hours:.1f} core-hours = {hours / 2:.1f} h on 2 cores (two single-threaded processes)\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Estimate the CPU time of Experiments A and B from a measured pilot, before launching them.

The pilot (docs/evidence-pilot/results) ran each distinct kind of run of both grids for 10
optimizer steps on the idle machine, one process on one pinned core, single-threaded as the
grids run, and scored 80 of the evaluation questions:

    OMP_NUM_THREADS=1 taskset -c 0 gastune bench --config benchmarks/evidence_a.yaml \\
        --methods lora,gast,rst,gast-random,gast-topk --seeds 0 --set max_steps=10 \\
        --eval-set per_task=10 --results docs/evidence-pilot/results --docs /tmp/pilot-a
    (the same with evidence_b.yaml --methods greats,maxloss,random-half)

`ist` and `gast-batch` were timed in an earlier idle pilot (docs/evidence-pilot/results-937926d,
8 steps), before the fused loss stopped projecting prompt tokens; they are scaled by what that
change did to their analogue measured in both pilots (lora for ist, gast for gast-batch). Entries
that differ from a measured one only in a setting that does not change the cost (learning rate,
where the support batch comes from) take its cost. The pilot's evaluation ran the NLL as a separate
pass; `--fold` is the measured ratio of the folded evaluation to that (benchmarks/nll_fold_timing.py).

    python benchmarks/evidence_budget.py --fold 0.94            # markdown tables for docs/experiments.md
    python benchmarks/evidence_budget.py --fold 0.94 --spent    # the finished runs against it

`--spent` puts each finished run file's own cost (its training wall clock + its evaluation,
one core each, plus the same start-up allowance) beside the estimate for the same runs, and
projects the missing runs at the measured/estimated ratio: the estimate came from an idle
machine, the grids run two at a time on its two cores.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from gastune.experiments.grid import load_grid
from gastune.experiments.summary import load_runs
from gastune.provenance import provenance

# Same cost as a measured entry: they differ in the learning rate or the support set's source.
SAME_COST = {"lora-lr3e-4": "lora", "gast-lr3e-4": "gast", "gast-heldout": "gast"}
# Timed only in the earlier pilot: scaled by the change of this analogue between the two pilots.
EARLIER = {"ist": "lora", "gast-batch": "gast"}
# Per run outside training and evaluation (process start, model load, tokenising, the report):
# measured from the pilot's log, the run's start to its result file, minus train and eval time.
OVERHEAD_S = 25.0


def _by_name(folder: str) -> dict[str, dict]:
    return {r["name"]: r for r in load_runs(folder)}


def costs(pilot_dir: str, earlier_dir: str, fold: float) -> tuple[dict[str, float], float, list[str]]:
    """Seconds per step of every measured entry, eval seconds per question, and how each was got."""
    pilot, earlier = _by_name(pilot_dir), _by_name(earlier_dir)
    step = {n: r["train"]["seconds_per_step"] for n, r in pilot.items()}
    notes = []
    for name, analogue in EARLIER.items():
        scale = step[analogue] / earlier[analogue]["train"]["seconds_per_step"]
        step[name] = earlier[name]["train"]["seconds_per_step"] * scale
        notes.append(f"{name}: earlier pilot × {scale:.2f} ({analogue}'s change)")
    per_question = statistics.fmean(r["eval"]["seconds"] / r["eval"]["settings"]["n"] for r in pilot.values())
    notes.append(f"evaluation: {per_question:.3f} s per question in the pilot × {fold:.2f} (NLL folded)")
    return step, per_question * fold, notes


def _plan(grid_path: str, step: dict[str, float], per_question: float):
    """The grid, its steps per run, evaluation seconds per run, and each entry's seconds per run."""
    grid = load_grid(grid_path)
    t = grid.train
    steps = t["per_task"] * 8 // (t["per_device_train_batch_size"] * t.get("gradient_accumulation_steps", 1))
    eval_s = grid.eval.per_task * 8 * per_question
    per_run = {
        e.name: steps * step[SAME_COST.get(e.name, e.name)] + eval_s + OVERHEAD_S for e in grid.methods
    }
    return grid, steps, eval_s, per_run


def estimate(grid_path: str, step: dict[str, float], per_question: float):
    """Markdown rows (entry, cost source, s/step, minutes per run, seeds, core-hours) and the total."""
    grid, steps, eval_s, per_run = _plan(grid_path, step, per_question)
    t = grid.train
    questions = grid.eval.per_task * 8
    rows, total = [], 0.0
    for entry in grid.methods:
        source = SAME_COST.get(entry.name, entry.name)
        how = "pilot" if source == entry.name else f"as {source}"
        if entry.name in EARLIER:
            how = "earlier pilot, scaled"
        n = sum(1 for run in grid.runs() if run.name == entry.name)
        total += n * per_run[entry.name]
        rows.append(
            f"| {entry.name} | {how} | {step[source]:.2f} | {steps * step[source] / 60:.1f} | "
            f"{eval_s / 60:.1f} | {n} | {n * per_run[entry.name] / 3600:.2f} |"
        )
    head = [
        f"{grid_path}: {steps} steps of {t['per_device_train_batch_size']}, {questions} questions",
        "",
        "| entry | cost from | s/step | train min/run | eval min/run | runs | core-hours |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    return [*head, *rows, f"| **total** | | | | | | **{total / 3600:.2f}** |"], total


def spent(grid_path: str, step: dict[str, float], per_question: float):
    """Markdown rows (entry, runs done, measured and estimated core-hours, ratio) and the totals.

    A run's measured cost is its file's ``train.train_seconds`` (a resumed run: the segments
    that produced its steps, not the lost ones) + ``eval.seconds`` + the start-up allowance.
    Returns the lines, the measured and estimated seconds of the finished runs, and the
    estimated seconds of the missing ones.
    """
    grid, _, _, per_run = _plan(grid_path, step, per_question)
    runs = load_runs(grid.results) if Path(grid.results).is_dir() else []
    done = {(r["name"], r["seed"]) for r in runs}
    missing_est = sum(per_run[r.name] for r in grid.runs() if (r.name, r.seed) not in done)
    rows, measured, estimated = [], 0.0, 0.0
    for entry in grid.methods:
        mine = [r for r in runs if r["name"] == entry.name]
        if not mine:
            continue
        m = sum(r["train"]["train_seconds"] + r["eval"]["seconds"] + OVERHEAD_S for r in mine)
        e = len(mine) * per_run[entry.name]
        measured, estimated = measured + m, estimated + e
        rows.append(f"| {entry.name} | {len(mine)} | {m / 3600:.2f} | {e / 3600:.2f} | {m / e:.2f} |")
    head = [
        f"{grid_path}: {len(done)} of {len(grid.runs())} runs finished",
        "",
        "| entry | runs done | measured core-hours | estimated | × estimate |",
        "|---|---:|---:|---:|---:|",
    ]
    if rows:
        rows.append(
            f"| **total** | {len(done)} | **{measured / 3600:.2f}** | {estimated / 3600:.2f} | "
            f"**{measured / estimated:.2f}** |"
        )
    return [*head, *rows], measured, estimated, missing_est


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pilot", default="docs/evidence-pilot/results")
    ap.add_argument("--earlier", default="docs/evidence-pilot/results-937926d")
    ap.add_argument("--fold", type=float, required=True, help="folded / separate evaluation time (measured)")
    ap.add_argument("--spent", action="store_true", help="the finished runs' own cost against the estimate")
    ap.add_argument(
        "--out", default=None, help="with --spent: also write the report here (markdown, with provenance)"
    )
    args = ap.parse_args()
    step, per_question, notes = costs(args.pilot, args.earlier, args.fold)
    if args.spent:
        text = report_spent(step, per_question)
        print(text)
        if args.out:
            write_spent(Path(args.out), text, args.fold)
        return 0
    print("\n".join(f"- {n}" for n in notes) + f"\n- per run: {OVERHEAD_S:.0f} s of start-up\n")
    grand = 0.0
    for path in ("benchmarks/evidence_a.yaml", "benchmarks/evidence_b.yaml"):
        lines, total = estimate(path, step, per_question)
        grand += total
        print("\n".join(lines) + "\n")
    hours = grand / 3600
    print(
        f"both grids: {hours:.1f} core-hours = {hours / 2:.1f} h on 2 cores (two single-threaded processes)"
    )
    return 0


def report_spent(step: dict[str, float], per_question: float) -> str:
    """The finished runs' cost per entry against the estimate, and the projection, as markdown."""
    measured = estimated = missing = 0.0
    parts = []
    for path in ("benchmarks/evidence_a.yaml", "benchmarks/evidence_b.yaml"):
        lines, m, e, rest = spent(path, step, per_question)
        measured, estimated, missing = measured + m, estimated + e, missing + rest
        parts.append("\n".join(lines) + "\n")
    if not estimated:
        return "\n".join([*parts, "no run finished yet"])
    ratio = measured / estimated
    left = missing * ratio / 3600
    parts.append(
        f"finished: {measured / 3600:.1f} core-hours, x{ratio:.2f} the estimate for the same runs; "
        f"missing runs: {missing / 3600:.1f} core-hours by the estimate, {left:.1f} at x{ratio:.2f} "
        f"= {left / 2:.1f} h on 2 cores; both grids in all: {(measured / 3600 + left) / 2:.1f} h on 2 cores"
    )
    return "\n".join(parts)


def write_spent(path: Path, text: str, fold: float) -> None:
    """The --spent report as a page: the command, commit and date first, so it can be re-run."""
    info = provenance()
    commit = (info["git"]["commit"] or "unknown")[:8] + (" (dirty)" if info["git"]["dirty"] else "")
    head = (
        "# Evidence grids: compute spent against the estimate\n\n"
        f"Generated by `python benchmarks/evidence_budget.py --fold {fold} --spent --out {path}` "
        f"on {info['date'][:16].replace('T', ' ')} UTC at commit {commit}, from the run files committed "
        "then; the estimate is the pilot's (docs/experiments.md, Budget).\n\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + text + "\n")


if __name__ == "__main__":
    raise SystemExit(main())

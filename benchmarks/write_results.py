"""Write docs/RESULTS.md from run files: Experiments A and B (issue 16), then the CPU grid.

Everything in the page is computed from committed result files, so it can be rebuilt at any
time (after more runs land, or on another machine's results):

    python benchmarks/write_results.py                 # the committed grids
    python benchmarks/write_results.py --grid-a G --grid-b G --out docs/RESULTS.md

- Experiments A (clean data, benchmarks/evidence_a.yaml) and B (30% label noise,
  benchmarks/evidence_b.yaml): a table per experiment (held-out NLL of the gold response,
  accuracy, cost), every paired difference with its bootstrap 95% interval over questions
  and seeds, loss-versus-step and loss-versus-wall-clock curves, GAST's selection heat map,
  and a plain verdict per question (i)–(v) (gastune.experiments.verdicts): a difference is a
  finding only when its interval excludes 0. Where run files are missing the page says
  "not yet run"; partial grids are reported as partial.
- The CPU-sized grid (benchmarks/commonsense_grid_cpu.yaml, run before NLL was measured):
  its table, the base model, and its orderings seed by seed, as before.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cpu_results import cpu_section

from gastune.experiments.curves import plot_loss_step_and_time
from gastune.experiments.grid import Grid, load_grid
from gastune.experiments.paired import format_comparisons
from gastune.experiments.plots import pick_selection_run, plot_selection
from gastune.experiments.report import describe
from gastune.experiments.summary import format_summary_table, load_runs, summarize
from gastune.experiments.verdicts import (
    QUESTIONS,
    kept_rows,
    noise_costs,
    pair_sentence,
    question_verdict,
    seeds_short,
)
from gastune.provenance import git_info

NOT_RUN = "not yet run"


def _runs(grid: Grid) -> list[dict]:
    return load_runs(grid.results) if Path(grid.results).is_dir() else []


def _link(target: Path, page: Path) -> str:
    return os.path.relpath(target, page.parent).replace(os.sep, "/")


def experiment_section(title: str, grid_path: str, grid: Grid, runs: list[dict], page: Path) -> list[str]:
    """Table, paired differences and figures of one experiment (or why they are missing)."""
    expected = grid.runs()
    lines = [f"### {title}", "", f"Grid: `{grid_path}`; run files: `{grid.results}`."]
    done = {(r["name"], r["seed"]) for r in runs}
    missing = [r.run_id for r in expected if (r.name, r.seed) not in done]
    if not runs:
        return [*lines, "", f"**{NOT_RUN}**: none of its {len(expected)} run files exists yet.", ""]
    lines += ["", *(f"- {line}" for line in describe(runs))]
    if missing:
        lines.append(f"- Partial: {len(done)} of {len(expected)} runs done; missing: {', '.join(missing)}.")
    lines.append(f"- {compute_line(runs)}")
    summary = summarize(runs, order=[m.name for m in grid.methods])
    lines += [
        "",
        "NLL: held-out NLL of the gold response, nats per token (mean over questions; lower is better); "
        "accuracy in %; both mean ± sample std over seeds. Cost: seconds per optimizer step and peak "
        "memory, with ratios to LoRA. They are each run's own, on a shared machine whose other core ran "
        "another run or a benchmark for most of them, so they move with that load; the controlled cost "
        "comparison is benchmarks/step_cost.py's (the README's Cost table).",
        "",
        format_summary_table(summary),
        "",
    ]
    docs = Path(grid.docs)
    figures = [
        f"[loss vs step and vs wall-clock]({_link(plot_loss_step_and_time(runs, docs / 'loss_step_time.png', order=list(summary), title=title), page)})"
    ]
    chosen = pick_selection_run(runs)
    if chosen is not None:
        heatmap = plot_selection(chosen, docs / "selection_heatmap.png")
        figures.append(
            f"[GAST's selection heat map ({chosen['name']}, seed {chosen['seed']})]({_link(heatmap, page)})"
        )
    lines += [
        "Figures: " + ", ".join(figures) + ". The train loss is over what each method trained on (maxloss, "
        "random-half, greats: their kept rows; in B, the noisy labels), so the curves compare speed of "
        "fitting, not quality; the held-out NLL above is the comparable number.",
        "",
    ]
    return lines


def compute_line(runs: list[dict]) -> str:
    """What the runs cost in core-hours: training wall clock + evaluation, one core each."""
    train = sum(r["train"].get("train_seconds") or 0.0 for r in runs) / 3600
    scoring = sum(r["eval"].get("seconds") or 0.0 for r in runs) / 3600
    return (
        f"Compute: {train + scoring:.2f} core-hours ({train:.2f} training + {scoring:.2f} evaluation, "
        "each run's own wall clock on one core); `python benchmarks/evidence_budget.py --fold 0.94 "
        "--spent` sets them against the plan's estimate."
    )


def _pct(x: float | None, scale: float = 100, fmt: str = ".0f", unit: str = "%") -> str:
    return "-" if x is None else f"{scale * x:{fmt}}{unit}"


def _kept_spread(rows: list[dict], base_acc: float | None) -> str:
    """Where the two kept columns lie, and what each divides by."""
    nll = [r["kept"] for r in rows if r["kept"] is not None]
    acc = [r["acc_kept"] for r in rows if r["acc_kept"] is not None]
    gains = [100 * (r["clean_accuracy"] - base_acc) for r in rows if r["acc_kept"] is not None]
    if not nll or not acc:
        return ""
    return (
        f" Kept spans {100 * min(nll):.0f}–{100 * max(nll):.0f}% on NLL and {100 * min(acc):.0f}–"
        f"{100 * max(acc):.0f}% on accuracy. The NLL gain over the base includes what any training on "
        "these prompts learns (the form of an answer), which wrong labels leave alone; kept on accuracy "
        f"divides by a clean accuracy gain of {min(gains):.1f}–{max(gains):.1f} points, so a point more or "
        "less moves it a lot."
    )


def kept_section(clean: list[dict], noisy: list[dict], base_path: Path, costs: list[dict]) -> list[str]:
    """How much of the clean-data result each method keeps at 30% noise, and the paired cost of the noise."""
    base = json.loads(base_path.read_text()) if base_path.is_file() else None
    base_nll = ((base or {}).get("nll") or {}).get("mean")
    base_acc = ((base or {}).get("results") or {}).get("average")
    rows = kept_rows(clean, noisy, base_nll, base_acc)
    if not rows:
        return []
    lines = [
        "How much of the clean-data result each method keeps at 30% noise: kept = (base − noisy) / "
        "(base − clean) on mean NLL, and (noisy − base) / (clean − base) on accuracy, where base is the "
        "untrained model on the same questions; the clean reference is the same entry in Experiment A, "
        "else gast for a gast variant, else lora; both sides are means over the seeds they share:",
        "",
        "| method (noisy) | seeds | NLL | clean reference | its NLL (clean) | kept (NLL) | accuracy "
        "| its accuracy (clean) | kept (accuracy) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        clean_nll = NOT_RUN if r["clean_nll"] is None else f"{r['clean_nll']:.4f}"
        lines.append(
            f"| {r['name']} | {', '.join(map(str, r['seeds'])) or '-'} | {_pct(r['nll'], 1, '.4f', '')} | "
            f"{r['clean'] or '-'} | {clean_nll} | "
            f"{_pct(r['kept'])} | {_pct(r['accuracy'], 100, '.1f', '')} | "
            f"{_pct(r['clean_accuracy'], 100, '.1f', '')} | {_pct(r['acc_kept'])} |"
        )
    if base_nll is None:
        lines += ["", f"(No base-model NLL in `{base_path}` yet: kept needs it; see docs/experiments.md.)"]
    else:
        lines += [
            "",
            f"Base model (no training) on the same questions: NLL {base_nll:.4f}, accuracy "
            f"{_pct(base_acc, 100, '.1f', '')} (`{base_path}`).{_kept_spread(rows, base_acc)} The paired costs "
            "below carry the intervals.",
        ]
    cost_rows = [c for c in costs if c["kind"] == "cost"]
    if cost_rows:
        lines += [
            "",
            "What the noise costs, paired by seed and question (a − b: each noisy run minus its clean "
            "reference of the same seed). Where the reference is another entry (gast-heldout against "
            "gast, greats, maxloss and random-half against lora), the row holds the change of method "
            "as well as the noise:",
            "",
            format_comparisons(cost_rows),
        ]
    return [*lines, ""]


def robustness_lines(costs: list[dict], expected_seeds: list[int]) -> tuple[list[str], list[dict]]:
    """(v)'s difference-of-differences sentences: what the noise costs a method minus what it costs lora."""
    versus = [c for c in costs if c["kind"] == "versus lora"]
    lines = []
    for nll in (c for c in versus if c["metric"] == "nll"):
        accuracy = next((c for c in versus if c["metric"] == "accuracy" and c["a"] == nll["a"]), None)
        partial = seeds_short(nll, expected_seeds)
        label = (
            f"{nll['a']} − {nll['b']} (each noisy run minus its clean reference of the same seed in "
            "Experiment A)"
        )
        lines.append(f"{label}{f' ({partial})' if partial else ''}: {pair_sentence(nll, accuracy)}")
    return lines, versus


def entry_seeds(grid: Grid) -> dict[str, list[int]]:
    """Each entry's planned seeds: the learning-rate check runs 3 of A's 5 by design, and a pair
    of its entries with all 3 is complete, not "partial"."""
    seeds: dict[str, list[int]] = {}
    for run in grid.runs():
        seeds.setdefault(run.name, []).append(run.seed)
    return seeds


def verdict_section(
    runs_a: list[dict], runs_b: list[dict], grid_a: Grid, grid_b: Grid, n_boot: int, costs: list[dict]
):
    """The plain verdicts (i)–(v) and every paired comparison behind them; (v) adds the noise costs."""
    verdicts = [
        question_verdict(
            q,
            runs_a if q.experiment == "A" else runs_b,
            entry_seeds(grid_a if q.experiment == "A" else grid_b),
            n_boot=n_boot,
        )
        for q in QUESTIONS
    ]
    extra_lines, extra = robustness_lines(costs, grid_b.seeds)
    noisy = next(v for v in verdicts if v["key"] == "v")  # the noisy-label question
    noisy["lines"] += extra_lines
    noisy["comparisons"] += extra
    lines = ["### Verdicts", ""]
    for v in verdicts:
        lines.append(f"- **({v['key']}) {v['title']}: {v['summary']}.**")
        lines += [f"  - {line}" for line in v["lines"]]
    lines += [
        "",
        "A difference is *resolved* when its bootstrap 95% interval (over questions and seeds, "
        "resampled together; gastune.experiments.paired) excludes 0; otherwise the experiment cannot tell "
        "the two apart at this budget, which is reported as plainly as a difference. The learning-rate "
        "check of (i) picks each method's better learning rate by its mean NLL over seeds, on the same "
        "questions (a mild selection effect in the methods' favour, the same for both).",
        "",
    ]
    comparisons = [c for v in verdicts for c in v["comparisons"]]
    if comparisons:
        lines += ["Every paired difference (a − b):", "", format_comparisons(comparisons), ""]
    return lines, verdicts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid-a", default="benchmarks/evidence_a.yaml")
    ap.add_argument("--grid-b", default="benchmarks/evidence_b.yaml")
    ap.add_argument("--base-a", default="docs/evidence-a/base.json", help="gastune eval of the base model")
    ap.add_argument("--cpu-grid", default="benchmarks/commonsense_grid_cpu.yaml")
    ap.add_argument("--cpu-base", default="docs/experiment-cpu/base.json")
    ap.add_argument("--out", default="docs/RESULTS.md")
    ap.add_argument("--n-boot", type=int, default=4000, help="bootstrap replicates per comparison")
    args = ap.parse_args(argv)

    page = Path(args.out)
    grid_a, grid_b = load_grid(args.grid_a), load_grid(args.grid_b)
    if grid_b.train.get("label_noise") != 0.3:  # the page's wording and question (v) are about 30%
        raise SystemExit(
            f"{args.grid_b}: label_noise is {grid_b.train.get('label_noise')}, this page is written for 0.3"
        )
    runs_a, runs_b = _runs(grid_a), _runs(grid_b)
    costs = noise_costs(runs_a, runs_b, n_boot=args.n_boot) if runs_a and runs_b else []
    verdict_lines, verdicts = verdict_section(runs_a, runs_b, grid_a, grid_b, args.n_boot, costs)
    commit = (git_info(Path(__file__).parent)["commit"] or "unknown")[:8]
    lines = [
        "# Results",
        "",
        f"Generated by `python benchmarks/write_results.py` from the run files named below (each carries "
        f"its git commit, machine and date). Page written at commit {commit}.",
        "",
        "## Evidence that decides: Experiments A and B (issue 16)",
        "",
        "Experiment A trains on clean data (96 optimizer steps of 8, five seeds, LoRA and GAST each at two "
        "learning rates); Experiment B on the same data with 30% of the answers moved to a wrong option "
        "of the same question. Both are scored on the same 800 validation questions (100 per task) by the "
        "held-out NLL of the gold response (primary) and accuracy (secondary). Plan and budget: "
        "docs/experiments.md.",
        "",
        *verdict_lines,
        *experiment_section("Experiment A: clean data", args.grid_a, grid_a, runs_a, page),
        *experiment_section("Experiment B: 30% label noise", args.grid_b, grid_b, runs_b, page),
        *(kept_section(runs_a, runs_b, Path(args.base_a), costs) if runs_b else []),
        *cpu_section(args.cpu_grid, args.cpu_base, page),
    ]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines))
    states = ", ".join(f"({v['key']}) {v['summary']}" for v in verdicts)
    print(f"wrote {page} (A: {len(runs_a)} runs, B: {len(runs_b)} runs; {states})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``gastune bench``: train and evaluate a methods × seeds grid, then tabulate and plot it.

Each (method, seed) run writes its own result file and runs whose file exists are skipped,
so a long grid can run in pieces (``--max-runs``) and resume; the table and figures are
rebuilt from whatever results exist after every piece.

Usage:
    gastune bench --config benchmarks/commonsense_grid.yaml                  # the whole grid
    gastune bench --config benchmarks/commonsense_grid.yaml --max-runs 3     # a piece of it
    gastune bench --config benchmarks/commonsense_grid.yaml --methods lora,gast --seeds 0
    gastune bench --config benchmarks/commonsense_grid.yaml --dry-run        # what is done / left
    gastune bench --config benchmarks/commonsense_grid.yaml --report-only    # table and plots only
    gastune bench --methods lora,gast --seeds 0,1 --set max_steps=20 --set per_task=16 \\
        --results runs/quick/results --docs runs/quick                       # a grid from flags
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
from pathlib import Path

from gastune.errors import GastuneError

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="train + evaluate methods × seeds; one result file per run; table and plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="grid YAML (see benchmarks/commonsense_grid.yaml)")
    p.add_argument("--methods", default=None, help="comma-separated entry names: a subset of the grid's")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the grid's)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a training setting"
    )
    p.add_argument(
        "--eval-set", action="append", default=[], metavar="KEY=VALUE", help="override an eval setting"
    )
    p.add_argument("--results", default=None, help="folder of the per-run result files")
    p.add_argument("--docs", default=None, help="folder for the table, summary and plots")
    p.add_argument(
        "--runs-dir",
        default=None,
        help="folder of the run folders (adapters, checkpoints); with --results elsewhere and no "
        "--runs-dir, a folder of their own next to the grid's",
    )
    p.add_argument("--max-runs", type=int, default=None, help="run at most this many missing runs now")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    p.add_argument("--in-process", action="store_true", help="run in this process, not one subprocess each")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the runs (done, to do, or stale: other settings) and stop",
    )
    p.add_argument("--report-only", action="store_true", help="rebuild the table and plots from results")
    p.set_defaults(run=run)


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _pairs(items: list[str], flag: str) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise GastuneError(f"{flag} takes KEY=VALUE, got '{item}'")
        parsed = yaml.safe_load(value)  # "20" -> 20, "true" -> True, "a,b" -> "a,b"
        if isinstance(parsed, str) and _EXPONENT.fullmatch(parsed.strip()):
            parsed = float(parsed)  # YAML 1.1 reads 1e-4 (no dot) as text; on a command line it is a number
        out[key.strip()] = parsed
    return out


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def build_grid(args: argparse.Namespace):
    """The grid from ``--config`` (or from the flags alone), with the flags' overrides applied."""
    from gastune.experiments.grid import Grid, grid_from_dict, load_grid

    if args.config:
        data = load_grid(args.config).to_dict()
    elif args.methods:
        data = {"methods": _csv(args.methods)}
    else:
        raise GastuneError("give --config GRID.yaml, or --methods for a grid from flags")
    if args.config and args.methods:
        wanted = _csv(args.methods)
        names = [m["name"] for m in data["methods"]]
        missing = [w for w in wanted if w not in names]
        if missing:
            raise GastuneError(f"--methods {', '.join(missing)}: not in the grid (it has {', '.join(names)})")
        data["methods"] = [m for m in data["methods"] if m["name"] in wanted]
    if args.seeds:
        try:
            data["seeds"] = [int(s) for s in _csv(args.seeds)]
        except ValueError as exc:
            raise GastuneError(f"--seeds takes integers, got '{args.seeds}'") from exc
    data["train"] = {**data.get("train", {}), **_pairs(args.set, "--set")}
    data["eval"] = {**data.get("eval", {}), **_pairs(args.eval_set, "--eval-set")}
    grid_results = data.get("results", Grid.results)
    for key in ("results", "docs", "threads", "runs_dir"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if args.results is not None and args.runs_dir is None:
        data["runs_dir"] = _own_runs_dir(data.get("runs_dir", Grid.runs_dir), grid_results, args.results)
    return grid_from_dict(data)


def _own_runs_dir(runs_dir: str, grid_results: str, results: str) -> str:
    """Run folders for results written elsewhere than the grid's: never the grid's own.

    A quick check (other settings, other results) sharing the grid's run folders would find a
    real run's checkpoints there and delete them as "other settings", or write into the folder
    of a run in progress.
    """
    if Path(results).resolve() == Path(grid_results).resolve():
        return runs_dir
    tag = hashlib.sha1(str(Path(results).resolve()).encode()).hexdigest()[:8]
    own = f"{runs_dir.rstrip('/')}-{tag}"
    logger.info("results in %s, not the grid's %s: run folders in %s", results, grid_results, own)
    return own


def run(args: argparse.Namespace) -> int:
    from gastune.experiments import build_report, run_grid
    from gastune.experiments.runner import check_grid, run_state

    if args.report_only and not args.config and not args.methods:
        results = args.results or "docs/experiment/results"
        docs, order, grid = args.docs or "docs/experiment", None, None
    else:
        grid = build_grid(args)
        results, docs, order = grid.results, grid.docs, [m.name for m in grid.methods]
    if args.dry_run:
        if grid is None:
            raise GastuneError("--dry-run needs a grid: --config GRID.yaml or --methods")
        check_grid(grid)  # every run's configs build: the grid is runnable as written
        states = [(spec, run_state(grid, spec)) for spec in grid.runs()]
        for spec, state in states:
            print(f"{spec.run_id:32s} {state:6s} {grid.result_path(spec)}")
        stale = sum(state == "stale" for _, state in states)
        if stale:
            print(
                f"{stale} run file(s) stale: produced with other settings than the grid's now; delete to re-run"
            )
        return 0
    status = 0
    if not args.report_only:
        if args.max_runs is not None and args.max_runs < 1:
            raise GastuneError(f"--max-runs must be >= 1, got {args.max_runs}")
        outcome = run_grid(grid, isolate=not args.in_process, max_runs=args.max_runs)
        print(
            f"runs done now {len(outcome.done)}, already done {len(outcome.skipped)}, "
            f"failed {len(outcome.failed)}, left for later {len(outcome.pending)}"
        )
        if outcome.failed:
            print("failed: " + ", ".join(outcome.failed))
            status = 1
    if not Path(results).is_dir() or not any(Path(results).glob("*.json")):
        print(f"no results in {results} yet: nothing to report")
        return status
    paths = build_report(results, docs, order=order)
    print(paths["table"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return status

"""Two single-threaded runs side by side, or one two-threaded run at a time: which finishes
the evidence grids sooner on this 2-core machine?

benchmarks/evidence_run.sh runs two copies, one per core, one thread each; two processes on
two cores share the memory bus, so each is slower than alone. One process with two threads
shares nothing but waits for its threads at every matrix product. Only a measurement on the
otherwise idle machine decides. Both ways run the same short piece of the real grid (an entry
of benchmarks/evidence_a.yaml, ``--steps`` optimizer steps, ``--per-task`` questions per task)
with `gastune bench`, rounds alternating (pair, solo, pair, solo ...):

- pair: two runs at once, seeds 0 and 1, each pinned to its own core with 1 thread;
- solo: one run (seed 0) on both cores with 2 threads.

Throughput is runs per unit time: a pair does two runs in its wall clock, a solo one. The
result file gives each way's seconds per optimizer step and per evaluated question, per run
and as throughput (pair: the slower run's time / 2), and the solo/pair ratio (below 1: solo is
faster per run of the grid).

    python benchmarks/evidence_threads.py --out docs/results/evidence_threads_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import provenance, write_json  # noqa: E402

GASTUNE = str(Path(sys.executable).parent / "gastune")


def _bench(entry: str, seed: int, threads: int, cores: str, steps: int, per_task: int, folder: Path):
    cmd = ["taskset", "-c", cores, GASTUNE, "bench", "--config", "benchmarks/evidence_a.yaml"]
    cmd += ["--methods", entry, "--seeds", str(seed), "--threads", str(threads)]
    cmd += ["--set", f"max_steps={steps}", "--eval-set", f"per_task={per_task}"]
    cmd += [
        "--results",
        str(folder / "results"),
        "--docs",
        str(folder / "docs"),
        "--runs-dir",
        str(folder / "runs"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _cost(folder: Path, entry: str, seed: int) -> dict[str, float]:
    run = json.loads((folder / "results" / f"{entry}-seed{seed}.json").read_text())
    times = run["train"]["step_times_s"][1:]  # the first step warms up
    return {
        "s_per_step": sum(times) / len(times),
        "s_per_question": run["eval"]["seconds"] / run["eval"]["settings"]["n"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entry", default="gast")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--per-task", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rounds = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            pair, solo = Path(tmp) / "pair", Path(tmp) / "solo"
            procs = [
                _bench(args.entry, s, 1, str(s), args.steps, args.per_task, pair / str(s)) for s in (0, 1)
            ]
            if any(p.wait() for p in procs):
                raise SystemExit("a pair run failed")
            if _bench(args.entry, 0, 2, "0,1", args.steps, args.per_task, solo).wait():
                raise SystemExit("the solo run failed")
            both = [_cost(pair / str(s), args.entry, s) for s in (0, 1)]
            one = _cost(solo, args.entry, 0)
        row = {"round": r, "pair": both, "solo": one}
        for key in ("s_per_step", "s_per_question"):
            per_run = max(b[key] for b in both) / 2  # the pair's throughput: two runs in the slower's time
            row[f"{key}_throughput"] = {
                "pair": per_run,
                "solo": one[key],
                "solo_over_pair": one[key] / per_run,
            }
        rounds.append(row)
        print(json.dumps(row, indent=1))
    if args.out:
        write_json(
            args.out,
            {"benchmark": "evidence_threads", "settings": vars(args), "rounds": rounds, **provenance()},
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

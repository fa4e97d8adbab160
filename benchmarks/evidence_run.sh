#!/usr/bin/env bash
# One core's share of Experiments A and B (issue 16), seed by seed, each finished run file
# committed as soon as it exists. Two copies, one per core, run the two disjoint halves:
#
#   nohup benchmarks/evidence_run.sh 0 > runs/evidence-core0.log 2>&1 &
#   nohup benchmarks/evidence_run.sh 1 > runs/evidence-core1.log 2>&1 &
#
# Stop it at any time (kill the process group). Re-running the same command resumes: runs
# with a result file are skipped and an interrupted run resumes from its last checkpoint
# (docs/experiments.md, "Budget"). Seeds go outermost, so every method has its seed 0 before
# any has its seed 1 and the paired comparisons fill in evenly. The halves are balanced by the
# pilot's per-run cost (docs/experiments.md); never give two processes the same entries.
# `--no-commit` leaves the result files uncommitted (e.g. on a scratch copy).
set -u -o pipefail
core=${1:?usage: benchmarks/evidence_run.sh 0|1 [--no-commit]}
commit=1
[[ ${2:-} == --no-commit ]] && commit=0
case $core in
  0) A=lora,gast-batch,ist,rst,lora-lr3e-4 B=lora,maxloss,random-half ;;
  1) A=gast,gast-random,gast-topk,gast-lr3e-4 B=gast,gast-heldout,greats ;;
  *) echo "core must be 0 or 1, got '$core'" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
GASTUNE=${GASTUNE:-.venv/bin/gastune}
export OMP_NUM_THREADS=1

commit_results() {  # only the result files; retry while another git command holds the index
  ((commit)) || return 0
  local paths=() p
  for p in docs/evidence-a/results docs/evidence-b/results docs/evidence-a/base.json; do
    [[ -e $p ]] && paths+=("$p")  # git add fails on a path that does not exist yet
  done
  ((${#paths[@]})) || return 0
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    git add -- "${paths[@]}" 2>/dev/null || { sleep 3; continue; }
    git diff --cached --quiet -- "${paths[@]}" && return 0
    git commit -q -m "evidence: run files finished on core $core ($1)" -- "${paths[@]}" && return 0
    sleep 3
  done
  echo "could not commit the result files of $1" >&2
}

bench() {  # grid, entries, seed: one entry at a time, each run file committed when it exists
  local entry results
  results=$(sed -n 's/^results: *\([^ #]*\).*/\1/p' "$1")
  for entry in ${2//,/ }; do
    # A finished run is skipped here rather than by `gastune bench`, which would still spend
    # most of a minute importing and rewriting the report pages to find it has nothing to do.
    [[ -n $results && -f $results/$entry-seed$3.json ]] && continue
    # The report pages go to an untracked folder: rewritten after every run, in docs/ they
    # would leave the checkout dirty while the next run file is written. At a stop point,
    # `gastune bench --config G --report-only` and write_results.py write the tracked ones.
    taskset -c "$core" "$GASTUNE" bench --config "$1" --methods "$entry" --seeds "$3" \
      --docs "runs/evidence-reports/core$core-$(basename "$1" .yaml)" || true
    commit_results "$(basename "$1" .yaml): $entry seed $3"
  done
}

# The skip above is by file name alone: a run file from other settings (an edited grid) would
# be kept without a word. Once per grid, `--dry-run` compares each of this half's files with
# the grid as written now and names the stale ones, so the log says so before hours are spent.
for grid in benchmarks/evidence_b.yaml benchmarks/evidence_a.yaml; do
  [[ $grid == *_b.yaml ]] && entries=$B || entries=$A
  "$GASTUNE" bench --config "$grid" --methods "$entries" --dry-run | grep -w stale >&2
done

# The untrained model on the same 800 questions: the base of "how much of its gain B keeps".
if ((core == 0)) && [[ ! -f docs/evidence-a/base.json ]]; then
  taskset -c 0 "$GASTUNE" eval --format rc --rule mean --per-task 100 --seed 1234 --threads 1 \
    --out docs/evidence-a/base.json && commit_results "the base model's evaluation"
fi

# Within a seed B goes first: it needs 3 seeds to A's 5, so a sitting that ends mid-grid
# leaves B complete (every point of issue 16's B holds) rather than both grids part-run.
for seed in 0 1 2 3 4; do
  ((seed <= 2)) && bench benchmarks/evidence_b.yaml "$B" "$seed"
  bench benchmarks/evidence_a.yaml "$A" "$seed"
done
echo "core $core: every run of its half has a result file (or failed: see above)"

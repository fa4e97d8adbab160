"""Evaluation time with the gold-response NLL as a separate pass vs folded into the ranking's.

Loads the default model once and times, in interleaved rounds, (a) ``evaluate_commonsense``
followed by ``gold_response_nll`` (the separate full forward per question) and (b)
``evaluate_commonsense_and_nll`` (the gold sequence scored on each prompt's cached prefix),
on the same validation questions; it also checks that both give the same numbers.

Usage (one core, as the experiments run):
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/nll_fold_timing.py --per-task 10 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gastune.data.commonsense import load_commonsense
from gastune.eval.loglik import evaluate_commonsense, evaluate_commonsense_and_nll
from gastune.eval.nll import gold_response_nll
from gastune.models import load_model, load_tokenizer
from gastune.provenance import provenance


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-task", type=int, default=10)
    parser.add_argument("--format", default="rc")
    parser.add_argument("--rule", default="mean")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer, model = load_tokenizer(args.model), load_model(args.model).eval()
    records = load_commonsense("validation", per_task=args.per_task, seed=1234, prompt_format=args.format)
    kw = {"batch_size": args.batch_size, "rule": args.rule, "prompt_format": args.format, "progress": False}
    # Wall and CPU seconds: on a shared, loaded core the process's CPU time is the steadier one.
    times: dict[str, list[float]] = {"separate": [], "folded": []}
    cpu: dict[str, list[float]] = {"separate": [], "folded": []}
    for _ in range(args.rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        ranked = evaluate_commonsense(model, tokenizer, records, **kw)
        alone = gold_response_nll(model, tokenizer, records, batch_size=args.batch_size)
        times["separate"].append(time.perf_counter() - start)
        cpu["separate"].append(time.process_time() - start_cpu)
        start, start_cpu = time.perf_counter(), time.process_time()
        result, nll = evaluate_commonsense_and_nll(model, tokenizer, records, **kw)
        times["folded"].append(time.perf_counter() - start)
        cpu["folded"].append(time.process_time() - start_cpu)
    worst = max(abs(a - b) / abs(b) for a, b in zip(nll.nll, alone.nll))
    out = {
        "questions": len(records),
        "seconds": times,
        "cpu_seconds": cpu,
        "median_ratio_folded_over_separate": statistics.median(
            f / s for f, s in zip(times["folded"], times["separate"])
        ),
        "median_cpu_ratio_folded_over_separate": statistics.median(
            f / s for f, s in zip(cpu["folded"], cpu["separate"])
        ),
        "folded_questions": nll.folded,
        "max_relative_nll_difference": worst,
        "same_predictions": [p.predicted for p in result.predictions]
        == [p.predicted for p in ranked.predictions],
        "nll_mean": [nll.mean, alone.mean],
        **{k: v for k, v in provenance("cpu").items() if k in ("git", "machine", "date")},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Seconds per LoRA training step on the default model with 1 and with 2 torch threads.

The demo's default thread count (``gastune.cli.threads``) comes from this measurement: on a
2-core machine shared with other processes, OpenMP threads that wait for each other at every
matrix product lose their turn, and two threads can be many times slower than one. Rounds
alternate 1 and 2 threads (1 2 1 2 ...) so machine noise hits both alike; each setting runs
one warm-up step, then ``--steps`` timed steps (batch 8 × 128 tokens, LoRA r=16).

Run:
    python benchmarks/threads.py --rounds 2 --out docs/results/threads_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import provenance, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", default="1,2", help="thread counts to alternate")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from gastune.models import load_model
    from gastune.training.adapters import apply_adapter

    torch.manual_seed(0)
    model = apply_adapter(load_model("smollm2-135m"), tuner="lora", r=16, alpha=32, dropout=0.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (8, 128))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    counts = [int(n) for n in args.threads.split(",")]
    runs = {n: [] for n in counts}
    for round_ in range(args.rounds):
        for n in counts:
            torch.set_num_threads(n)
            step()  # warm-up
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            seconds = (time.perf_counter() - start) / args.steps
            runs[n].append({"s_per_step": seconds, "loadavg_1min": os.getloadavg()[0], "round": round_})
            print(
                f"round {round_}: {n} thread(s) {seconds:.1f} s/step, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    document = {
        "benchmark": "threads",
        "settings": vars(args),
        "runs": {str(n): r for n, r in runs.items()},
        "ratio_to_1_thread": {
            str(n): [b["s_per_step"] / a["s_per_step"] for a, b in zip(runs[counts[0]], runs[n])]
            for n in counts
        },
        **provenance("cpu"),
    }
    if args.out:
        print(f"wrote {write_json(args.out, document)}")


if __name__ == "__main__":
    main()

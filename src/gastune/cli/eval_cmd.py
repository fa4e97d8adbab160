"""``gastune eval``: zero-shot log-likelihood accuracy on the commonsense tasks.

Usage:
    gastune eval --split validation --per-task 50 --out base.json
    gastune eval --adapter runs/lora --per-task 50 --out lora.json --compare base.json
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from gastune.data.prompts import COMMONSENSE_TASKS
from gastune.errors import GastuneError

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="log-likelihood multiple-choice accuracy on the commonsense tasks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="smollm2-135m", help="model name or folder (default: %(default)s)")
    parser.add_argument("--adapter", default=None, help="folder of a peft adapter to apply to the model")
    parser.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=COMMONSENSE_TASKS,
        default=None,
        metavar="TASK",
        help=f"tasks to evaluate (default: all of {', '.join(COMMONSENSE_TASKS)})",
    )
    parser.add_argument("--per-task", type=int, default=None, help="questions per task (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-task sample")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per forward pass")
    parser.add_argument(
        "--rule", default="sum", choices=("sum", "mean"), help="rank candidates by summed or mean log-prob"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument(
        "--compare", default=None, help="a results JSON to print a before/after table against"
    )
    parser.set_defaults(run=run)


def load_model_with_adapter(model_name: str, adapter: str | None, device: str):
    """The model (with the adapter applied, when given) on ``device``, and its tokenizer."""
    from gastune.models.loading import load_model, load_tokenizer

    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise GastuneError(f"'{adapter}' is not a peft adapter folder (no adapter_config.json)")
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.to(device).eval(), tokenizer


def run(args: argparse.Namespace) -> int:
    import torch

    from gastune.data.commonsense import load_commonsense
    from gastune.eval import (
        evaluate_commonsense,
        format_comparison_table,
        format_results_table,
        read_results,
        results_document,
        write_json,
    )

    if args.per_task is not None and args.per_task < 1:
        raise GastuneError(f"--per-task must be >= 1, got {args.per_task}")
    # Read the comparison file first, so that a wrong path fails before minutes of scoring.
    before = read_results(args.compare) if args.compare else None
    if args.threads is not None:
        if args.threads < 1:
            raise GastuneError(f"--threads must be >= 1, got {args.threads}")
        # On a busy machine fewer threads than cores can be faster: OpenMP threads that wait
        # for each other at every matrix product lose their turn to other processes.
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_with_adapter(args.model, args.adapter, device)
    records = load_commonsense(split=args.split, tasks=args.tasks, per_task=args.per_task, seed=args.seed)
    start = time.perf_counter()
    result = evaluate_commonsense(model, tokenizer, records, batch_size=args.batch_size, rule=args.rule)
    seconds = time.perf_counter() - start
    print(format_results_table(result))
    print(f"{len(records)} questions in {seconds:.1f} s")
    if before is not None:
        print()
        print(format_comparison_table(before, result, names=(Path(args.compare).stem, "this run")))
    if args.out:
        settings = {
            "split": args.split,
            "tasks": list(args.tasks or COMMONSENSE_TASKS),
            "per_task": args.per_task,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "threads": torch.get_num_threads(),
            "rule": args.rule,
            "seconds": round(seconds, 2),
        }
        document = results_document(result, args.model, args.adapter, settings=settings, device=device)
        print(f"wrote {write_json(args.out, document)}")
    return 0

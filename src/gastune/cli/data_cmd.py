"""``gastune data``: build the commonsense training records, or check a user data file.

Usage:
    gastune data commonsense --out data/commonsense_train.json
    gastune data commonsense --out val.jsonl --split validation --per-task 100 --seed 1
    gastune data commonsense --out arc.json --tasks arc_easy,arc_challenge
    gastune data commonsense --out rc.json --per-task 48 --format rc
    gastune data commonsense --out noisy.json --per-task 96 --seed 0 --label-noise 0.3
    gastune data commonsense --out support.json --per-task 8 --skip-per-task 96 --seed 0
    gastune data check my_data.jsonl
    gastune data check chat.jsonl --model smollm2-135m --cutoff_len 512
"""

from __future__ import annotations

import argparse
from collections import Counter

from gastune.data.prompts import PROMPT_FORMATS

# Kept literal so ``gastune --help`` need not import the data modules (a test checks it
# against gastune.data.commonsense.SPLITS).
SPLITS = ("train", "validation", "test")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="build the commonsense records or check a data file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="{commonsense,check}")
    build = sub.add_parser("commonsense", help="write LLM-Adapters records of the eight commonsense tasks")
    build.add_argument("--out", required=True, help="output file, .json (a list) or .jsonl")
    build.add_argument("--split", default="train", choices=SPLITS, help="(default: %(default)s)")
    build.add_argument("--per-task", type=int, default=None, help="random sample of N records per task")
    build.add_argument(
        "--seed", type=int, default=0, help="seed of the per-task sample (default: %(default)s)"
    )
    build.add_argument(
        "--tasks", default=None, help="comma-separated tasks, e.g. boolq,piqa (default: all with the split)"
    )
    build.add_argument(
        "--format",
        default="mc",
        choices=PROMPT_FORMATS,
        help="mc: LLM-Adapters (numbered choices, answer = label); rc: question only, answer = "
        "the option's text (default: %(default)s)",
    )
    build.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="move this share of each task's answers to a wrong option of the same question "
        "(seeded by --seed; corrupted records keep their true label in clean_answer)",
    )
    build.add_argument(
        "--skip-per-task",
        type=int,
        default=0,
        metavar="N",
        help="skip the first N of each task's seeded sample: with N = a training run's --per-task "
        "(same --seed), a held-out part of the split disjoint from its training sample",
    )
    check = sub.add_parser(
        "check",
        help="validate a training data file (.json, .jsonl or a saved dataset) and count its records",
        description="Validate a training data file and count its records. With --model, also "
        "tokenise it as 'gastune train' would (chat records through the model's chat template) "
        "and count the records that cutoff_len would cut or leave with no answer token.",
    )
    check.add_argument("source", help="the file or folder to read")
    check.add_argument("--model", default=None, help="also tokenise with this model's tokenizer")
    check.add_argument(
        "--cutoff_len", type=int, default=None, help="with --model (default: gastune train's default)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.data_command == "commonsense":
        return _run_commonsense(args)
    return _run_check(args)


def _run_commonsense(args: argparse.Namespace) -> int:
    from gastune.data.commonsense import load_commonsense
    from gastune.data.io import record_file_format, write_records
    from gastune.data.noise import check_fraction, corrupt_labels

    record_file_format(args.out)  # a bad name fails now, not after seconds of loading
    check_fraction(args.label_noise)
    records = load_commonsense(
        split=args.split,
        tasks=args.tasks,
        per_task=args.per_task,
        seed=args.seed,
        prompt_format=args.format,
        skip_per_task=args.skip_per_task,
    )
    records = corrupt_labels(records, args.label_noise, seed=args.seed)
    path = write_records(records, args.out)
    counts = Counter(r["task"] for r in records)
    noisy = Counter(r["task"] for r in records if "clean_answer" in r)
    width = max(map(len, counts))
    for task, n in counts.items():
        print(f"{task:<{width}}  {n:>6}" + (f"  ({noisy[task]} wrong answers)" if args.label_noise else ""))
    print(f"{'total':<{width}}  {len(records):>6}  ({args.split}) -> {path}")
    return 0


def _run_check(args: argparse.Namespace) -> int:
    from gastune.data.chat import is_chat
    from gastune.data.io import load_records

    records = load_records(args.source)
    chat = [r for r in records if is_chat(r)]
    with_prompt = sum(1 for r in records if not is_chat(r) and r["prompt"])
    plain = len(records) - len(chat) - with_prompt
    print(
        f"{args.source}: {len(records)} records ({with_prompt} with a prompt, {plain} plain text, {len(chat)} chat)"
    )
    if chat:
        turns = [m for r in chat for m in (r.get("messages") or [*r["prompt"], *r["completion"]])]
        assistant = sum(1 for m in turns if m["role"] == "assistant")
        print(f"  chat: {len(turns)} turns, {assistant} assistant turns")
    tasks = Counter(r["task"] for r in records if "task" in r)
    for task, n in tasks.most_common():
        print(f"  {task}: {n}")
    if args.model is not None:
        _check_tokens(records, args)
    return 0


def _check_tokens(records: list[dict], args: argparse.Namespace) -> None:
    from gastune.data.collate import tokenize_records
    from gastune.models import load_tokenizer
    from gastune.training.config import DataConfig

    cutoff = args.cutoff_len or DataConfig.cutoff_len
    tokenizer = load_tokenizer(args.model)
    full = tokenize_records(records, tokenizer, cutoff_len=2**31 - 1)  # nothing cut
    cut = sum(1 for item in full if len(item["input_ids"]) > cutoff)
    kept = tokenize_records(records, tokenizer, cutoff_len=cutoff)
    longest = max(len(item["input_ids"]) for item in full)
    print(
        f"  tokens ({args.model}): longest {longest}; cutoff_len={cutoff} cuts {cut} records and "
        f"drops {len(records) - len(kept)} that would keep no answer token"
    )

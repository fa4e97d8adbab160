"""``gastune eval``: zero-shot accuracy on the commonsense tasks, or on GSM8K.

Two protocols for the commonsense tasks: ``loglik`` (default) ranks each question's labels by
log-likelihood; ``generate`` is the LLM-Adapters protocol (greedy or beam generation of up to
32 tokens, the first stated label in the response is the prediction). ``--gsm8k`` evaluates
the GSM8K test split by generation and final-number match instead.

Usage:
    gastune eval --split validation --per-task 50 --out base.json
    gastune eval --adapter runs/lora --per-task 50 --out lora.json --compare base.json
    gastune eval --adapter runs/lora --protocol generate --num-beams 4 --per-task 50
    gastune eval --adapter runs/lora --gsm8k --per-task 100 --max-new-tokens 256
    gastune eval --adapter runs/demo/lora --per-task 40   # the format/rule it was trained with

With ``--adapter``, ``--format`` and ``--rule`` default to what the adapter's
``gastune_config.json`` records (the prompt format it was trained on); explicit flags win.

The commonsense evaluation also reports the held-out NLL of the gold response (the training
loss on each question: prompt + gold response + EOS, loss on the response; mean over the
questions of the per-token value, ``gastune.eval.nll``), scored within the option ranking's
pass as one more sequence on each prompt's cached prefix (one extra forward pass per question
under ``--protocol generate``); ``--no-nll`` skips it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from gastune.data.prompts import COMMONSENSE_TASKS, PROMPT_FORMATS, default_rule
from gastune.errors import GastuneError

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="accuracy on the commonsense tasks (log-likelihood or generation) or GSM8K",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="smollm2-135m", help="model name or folder (default: %(default)s)")
    parser.add_argument("--adapter", default=None, help="folder of a peft adapter to apply to the model")
    parser.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="score the adapter on --model even if it records another base model",
    )
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
    parser.add_argument(
        "--protocol",
        default="loglik",
        choices=("loglik", "generate"),
        help="commonsense: rank labels by log-likelihood, or generate and match the first label",
    )
    parser.add_argument(
        "--format",
        default=None,
        choices=PROMPT_FORMATS,
        help="loglik: rank the labels of the LLM-Adapters prompt (mc) or the options' texts after "
        "the bare question (rc) (default: the adapter's recorded format, else mc)",
    )
    parser.add_argument(
        "--gsm8k", action="store_true", help="evaluate GSM8K test (generation, final number) instead"
    )
    parser.add_argument("--num-beams", type=int, default=1, help="generation: 1 = greedy, >1 = beam search")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="generation: most new tokens (default: 32 for the commonsense tasks, 256 for GSM8K)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-task sample")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="questions per forward pass / generate call"
    )
    parser.add_argument(
        "--rule",
        default=None,
        choices=("sum", "mean"),
        help="rank candidates by summed or mean log-prob (default: the adapter's recorded rule, "
        "else mean for rc and sum for mc)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    parser.add_argument(
        "--nll",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="commonsense: also the held-out NLL of the gold response (default: on)",
    )
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument(
        "--compare", default=None, help="a results JSON to print a before/after table against"
    )
    parser.set_defaults(run=run)


def load_model_with_adapter(
    model_name: str, adapter: str | None, device: str, allow_base_mismatch: bool = False
):
    """The model (with the adapter applied, when given) on ``device``, and its tokenizer.

    The adapter folder is checked first (weights present and finite, the right base model;
    ``gastune.eval.adapter_checks``), so a bad one fails before the model loads.
    """
    from gastune.eval.adapter_checks import check_adapter, check_finite_parameters
    from gastune.models.loading import load_model, load_tokenizer
    from gastune.tuners import is_bottleneck_folder, load_bottleneck

    if adapter is not None:
        check_adapter(adapter, model_name, allow_base_mismatch)
    bottleneck = adapter is not None and is_bottleneck_folder(adapter)
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name)
    if bottleneck:
        model = load_bottleneck(model, adapter)
    elif adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    check_finite_parameters(model, model_name)
    return model.to(device).eval(), tokenizer


def adapter_method(adapter: str | None) -> str | None:
    """The training method recorded in an adapter folder's ``gastune_config.json``, if any."""
    if adapter is None:
        return None
    path = Path(adapter) / "gastune_config.json"
    try:
        return json.loads(path.read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        return None  # an adapter trained elsewhere: no record of how


def adapter_scoring(adapter: str | None) -> dict:
    """The ``{"format", "rule"}`` recorded in an adapter's ``gastune_config.json`` (may be empty).

    Adapters saved before the ``eval`` record existed give their training prompt format.
    """
    if adapter is None:
        return {}
    try:
        settings = json.loads((Path(adapter) / "gastune_config.json").read_text())
        recorded = settings.get("eval") or {}
        fmt = recorded.get("format") or (settings.get("data") or {}).get("prompt_format")
    except (OSError, ValueError, AttributeError):
        return {}  # an adapter trained elsewhere: no record of how
    if fmt not in PROMPT_FORMATS:
        return {}
    rule = recorded.get("rule")
    return {"format": fmt, "rule": rule if rule in ("sum", "mean") else default_rule(fmt)}


def _resolve_scoring(args: argparse.Namespace) -> None:
    """Fill ``--format``/``--rule`` left unset: from the adapter's record, else mc and its rule."""
    recorded = {} if args.gsm8k else adapter_scoring(args.adapter)
    if args.protocol == "generate" and args.format is None:
        recorded = {}  # generation names labels: the mc prompt, whatever the adapter trained on
    if recorded and (args.format is None or args.rule is None):
        told = [f"--{k} {recorded[k]}" for k in ("format", "rule") if getattr(args, k) is None]
        if args.format is None or args.format == recorded["format"]:
            print(f"using {' '.join(told)} (recorded with the adapter)")
            args.format = args.format or recorded["format"]
            args.rule = args.rule or recorded["rule"]
    args.format = args.format or "mc"
    args.rule = args.rule or default_rule(args.format)


def _check(args: argparse.Namespace) -> None:
    for flag in ("per_task", "num_beams", "max_new_tokens", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise GastuneError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.format == "rc" and args.protocol == "generate":
        raise GastuneError("--format rc ranks option texts by log-likelihood: use it with --protocol loglik")
    if args.gsm8k and (
        args.tasks or args.split != "validation" or args.protocol != "loglik" or args.format is not None
    ):
        raise GastuneError(
            "--gsm8k evaluates the GSM8K test split by generation: drop --tasks/--split/--protocol/--format"
        )


def _evaluate(args: argparse.Namespace, model, tokenizer):
    """``(result, number of questions, settings, gold NLL or None)`` for what the flags ask for."""
    from gastune.eval import evaluate_commonsense, evaluate_commonsense_generation, evaluate_gsm8k, load_gsm8k
    from gastune.eval.generate import DEFAULT_MAX_NEW_TOKENS
    from gastune.eval.gsm8k import DEFAULT_MAX_NEW_TOKENS as GSM8K_MAX_NEW_TOKENS

    settings = {"per_task": args.per_task, "seed": args.seed, "batch_size": args.batch_size}
    generation = {"num_beams": args.num_beams}
    if args.gsm8k:
        problems = load_gsm8k(limit=args.per_task, seed=args.seed)
        generation["max_new_tokens"] = args.max_new_tokens or GSM8K_MAX_NEW_TOKENS
        result = evaluate_gsm8k(model, tokenizer, problems, batch_size=args.batch_size, **generation)
        return (
            result,
            len(problems),
            {"task": "gsm8k", "split": "test", "protocol": "generate", **settings, **generation},
            None,
        )
    from gastune.data.commonsense import load_commonsense

    records = load_commonsense(
        split=args.split, tasks=args.tasks, per_task=args.per_task, seed=args.seed, prompt_format=args.format
    )
    settings = {
        "split": args.split,
        "tasks": list(args.tasks or COMMONSENSE_TASKS),
        "protocol": args.protocol,
        "format": args.format,
        **settings,
    }
    nll = None
    if args.nll and args.protocol == "generate":
        from gastune.eval.nll import gold_response_nll

        nll = gold_response_nll(model, tokenizer, records, batch_size=args.batch_size)
    if args.protocol == "generate":
        generation["max_new_tokens"] = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        result = evaluate_commonsense_generation(
            model, tokenizer, records, batch_size=args.batch_size, **generation
        )
        return result, len(records), {**settings, **generation}, nll
    ranking = {"batch_size": args.batch_size, "rule": args.rule, "prompt_format": args.format}
    if args.nll:  # the gold responses are scored within the ranking's pass
        from gastune.eval.loglik import evaluate_commonsense_and_nll

        result, nll = evaluate_commonsense_and_nll(model, tokenizer, records, **ranking)
    else:
        result = evaluate_commonsense(model, tokenizer, records, **ranking)
    return result, len(records), {**settings, "rule": args.rule}, nll


def run(args: argparse.Namespace) -> int:
    import torch

    from gastune.eval import (
        format_comparison_table,
        format_results_table,
        read_results,
        results_document,
        write_json,
    )
    from gastune.training.output_dir import check_writable

    _check(args)
    _resolve_scoring(args)
    # Read the comparison file and check --out first, so that they fail before minutes of scoring.
    before = read_results(args.compare) if args.compare else None
    if args.out:
        if Path(args.out).is_dir():
            raise GastuneError(f"--out {args.out} is a folder; give a file name")
        # a results file with per-question predictions is a few MB: demand 64 MiB free
        check_writable(Path(args.out).parent, 64 * 2**20, what="--out", needed_for="the results")
    if args.threads is not None:
        if args.threads < 1:
            raise GastuneError(f"--threads must be >= 1, got {args.threads}")
        # On a busy machine fewer threads than cores can be faster: OpenMP threads that wait
        # for each other at every matrix product lose their turn to other processes.
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_with_adapter(args.model, args.adapter, device, args.allow_base_mismatch)
    start = time.perf_counter()
    result, n_questions, settings, nll = _evaluate(args, model, tokenizer)
    seconds = time.perf_counter() - start
    print(format_results_table(result))
    if nll is not None:
        print(f"held-out NLL of the gold response: {nll.mean:.4f} nats per token (mean over questions)")
    print(f"{n_questions} questions in {seconds:.1f} s")
    if before is not None:
        print()
        print(format_comparison_table(before, result, names=(Path(args.compare).stem, "this run")))
    if args.out:
        settings.update(threads=torch.get_num_threads(), seconds=round(seconds, 2))
        document = results_document(result, args.model, args.adapter, settings=settings, device=device)
        document = {
            "model": args.model,
            "adapter": args.adapter,
            "method": adapter_method(args.adapter),
            **document,
        }
        if nll is not None:
            document["nll"] = nll.to_dict()
        print(f"wrote {write_json(args.out, document)}")
    return 0

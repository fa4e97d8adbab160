"""``gastune lm-eval``: the commonsense tasks in lm-evaluation-harness, offline, one command.

Writes the questions (the same sample ``gastune eval`` scores) and lm-eval task YAMLs that
read them from local files (``gastune.eval.harness``), loads the base model with the adapter,
and runs ``lm_eval.simple_evaluate`` on it with ``HF_DATASETS_OFFLINE=1``. Needs the optional
extra: ``pip install "gastune[lm-eval]"``.

Usage:
    gastune lm-eval --adapter runs/demo/gast --per-task 100 --out gast_harness.json
    gastune lm-eval --per-task 100                      # the base model alone
    gastune lm-eval --write-tasks lm_eval_tasks --format mc   # only write the task folder, then:
    lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER \\
        --include_path lm_eval_tasks --tasks gastune_commonsense_mc

``acc`` ranks the candidate responses by summed log-likelihood: on the same questions it
equals ``gastune eval --rule sum`` (an independent check of gastune's scorer). ``acc_norm``
is lm-eval's byte-length normalisation (not gastune's per-token ``--rule mean``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from gastune.data.prompts import COMMONSENSE_TASKS, PROMPT_FORMATS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness on the base model or an adapter, offline (extra: lm-eval)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="base model name or folder (default: %(default)s)")
    p.add_argument("--adapter", default=None, help="a peft adapter folder to evaluate on the base")
    p.add_argument("--tasks", nargs="+", choices=COMMONSENSE_TASKS, default=None, metavar="TASK")
    p.add_argument("--split", default="validation", choices=("validation", "test"))
    p.add_argument("--per-task", type=int, default=None, help="questions per task (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-task sample")
    p.add_argument(
        "--format",
        default=None,
        choices=PROMPT_FORMATS,
        help="default: the adapter's recorded format, else mc",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: the fastest in a short probe)"
    )
    p.add_argument("--write-tasks", default=None, metavar="DIR", help="only write the task folder to DIR")
    p.add_argument("--out", default=None, help="write a results JSON here")
    p.set_defaults(run=run)


def run(args) -> int:
    from gastune.cli.eval_cmd import adapter_scoring, load_model_with_adapter
    from gastune.cli.threads import set_threads
    from gastune.errors import GastuneError
    from gastune.eval.harness import group_name, run_harness, write_harness_tasks
    from gastune.models import resolve_model_path
    from gastune.provenance import provenance, write_json

    if args.per_task is not None and args.per_task < 1:
        raise GastuneError(f"--per-task must be >= 1, got {args.per_task}")
    fmt = args.format or adapter_scoring(args.adapter).get("format") or "mc"
    kwargs = {"tasks": args.tasks, "split": args.split, "per_task": args.per_task, "seed": args.seed}
    if args.write_tasks:
        names = write_harness_tasks(args.write_tasks, prompt_format=fmt, **kwargs)
        print(f"wrote {len(names)} tasks and the group {group_name(fmt)} to {args.write_tasks}")
        peft = f",peft={args.adapter}" if args.adapter else ""
        print(
            f"run: lm_eval --model hf --model_args pretrained={resolve_model_path(args.model)}{peft} "
            f"--include_path {args.write_tasks} --tasks {group_name(fmt)}"
        )
        return 0
    threads, _ = set_threads(args.threads)
    model, tokenizer = load_model_with_adapter(args.model, args.adapter, "cpu")
    with tempfile.TemporaryDirectory(prefix="gastune-lm-eval-") as folder:
        names = write_harness_tasks(folder, prompt_format=fmt, **kwargs)
        output = run_harness(model, tokenizer, folder, names, batch_size=args.batch_size)
    tasks = {}
    for name in names:
        metrics = output["results"][name]
        tasks[name] = {
            "n": len(output["samples"][name]),
            "acc": metrics["acc,none"],
            "acc_norm": metrics["acc_norm,none"],
        }
    average = sum(t["acc"] for t in tasks.values()) / len(tasks)
    width = max(len(n) for n in tasks)
    print(
        f"lm-evaluation-harness, {fmt} format ({'adapter ' + args.adapter if args.adapter else 'base model'}):"
    )
    print(f"{'task':<{width}}  {'n':>5}  {'acc':>6}  {'acc_norm':>8}")
    for name, t in tasks.items():
        print(f"{name:<{width}}  {t['n']:>5}  {t['acc']:>6.3f}  {t['acc_norm']:>8.3f}")
    print(f"{'average':<{width}}  {'':>5}  {average:>6.3f}")
    if args.out:
        import lm_eval

        document = {
            "model": args.model,
            "adapter": args.adapter,
            "format": fmt,
            "settings": {**kwargs, "tasks": list(args.tasks or COMMONSENSE_TASKS), "threads": threads},
            "lm_eval_version": lm_eval.__version__,
            "tasks": tasks,
            "average_acc": average,
            **provenance("cpu"),
        }
        print(f"wrote {write_json(Path(args.out), document)}")
    return 0

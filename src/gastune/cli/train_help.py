"""``gastune train --help``: gastune's own options first, grouped, then the Trainer's flags.

The parser is built from the same dataclasses ``gastune train`` parses (so no option is
missing or stale) and only regrouped for display; ``--config`` is handled before parsing
(``gastune.cli.config_args``) and added here so it is listed.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap

DESCRIPTION = """\
Fine-tune a causal LM with a parameter-efficient adapter (LoRA by default) and a training
method: GAST (per-layer sample selection), its baselines, or dense training. The adapter is
saved the standard peft way in --output_dir. Every option may also come from a YAML file
(--config); flags on the command line override it. All of transformers' TrainingArguments
work, listed after gastune's own options.

Data (--data): 'commonsense' (the eight-task mixture), or a .json/.jsonl file or saved HF
dataset with instruction/input/output, prompt/completion, text, or trl's chat formats
({"messages": [{"role", "content"}, ...]}, or prompt/completion as message lists; formatted
by the model's chat template, loss on the assistant turns)."""

EXAMPLES = """\
examples:
  gastune train --method gast --data data/cs.jsonl --max_steps 100 --output_dir runs/gast
  gastune train --config configs/gast.yaml --learning_rate 1e-4
  gastune train --method lora --data chat.jsonl --max_steps 50    # trl chat data ("messages")
  gastune train --method dense --tuner ia3 --per_task 50           # dense training, another tuner
  gastune data check chat.jsonl --model smollm2-135m               # validate data before training"""

# One line per registered method (a test checks this covers gastune.methods.METHODS and that
# each fits one line of an 80-column terminal); docs/methods.md has the details.
METHOD_HELP: dict[str, str] = {
    "lora": "dense LoRA: all samples, all layers",
    "dora": "dense DoRA",
    "dense": "dense, adapter from --tuner (ia3, ...)",
    "gast": "per layer, K of N samples by alignment",
    "ist": "25% of layers per step, by importance",
    "rst": "25% of layers per step, uniformly",
    "lisa": "a few layers, re-drawn every K steps",
    "fisher": "fixed top-k layers by Fisher score",
    "gast+ist": "GAST inside the layers IST keeps",
    "maxloss": "the highest-loss half of each batch",
    "random-half": "a random half of each batch",
    "gradnorm": "the half with the largest gradients",
    "greats": "half of each batch, GREATS's greedy",
}

_BASELINE_PREFIXES = ("ist_", "rst_", "lisa_", "fisher_", "select_", "greats_")
TRAINER_GROUP = "Trainer options (transformers.TrainingArguments)"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the description kept as written, and an option's help lines that start
    with two spaces (the method list) kept as lines, wrapped under their own text."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        lines: list[str] = []
        for line in text.splitlines():  # a loop: zero-argument super() fails inside a comprehension
            if line.startswith("  "):
                indent = " " * (len(line) - len(line.lstrip()) + _METHOD_COLUMN + 1)
                lines += textwrap.wrap(line, width, subsequent_indent=indent, drop_whitespace=True) or [""]
            else:
                lines += super()._split_lines(line, width) or [""]
        return lines


_METHOD_COLUMN = max(map(len, METHOD_HELP))


def method_help() -> str:
    """``--method``'s help: one line per registered method, in METHOD_HELP's order."""
    from gastune.methods import METHODS

    names = [name for name in METHOD_HELP if name in METHODS] + [n for n in METHODS if n not in METHOD_HELP]
    lines = [f"  {name:<{_METHOD_COLUMN}} {METHOD_HELP.get(name, '')}" for name in names]
    return ("Training method (docs/methods.md):\n" + "\n".join(lines)).replace(
        "%", "%%"
    )  # argparse %-formats help


def train_help_parser() -> argparse.ArgumentParser:
    """The display parser of ``gastune train``: its options in titled groups, gastune's first."""
    from transformers import HfArgumentParser, TrainingArguments

    from gastune.training.config import DataConfig, GastuneConfig, ModelConfig

    parser = HfArgumentParser(
        (ModelConfig, DataConfig, GastuneConfig),
        prog="gastune train",
        usage="gastune train [--config FILE.yaml] [--method METHOD] [--data DATA] [--OPTION VALUE ...]",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=_Formatter,
    )
    # Fields GastuneConfig declares itself (its own, and Trainer ones whose default it changes)
    # are gastune's; the other TrainingArguments fields are the Trainer's.
    own = set(GastuneConfig.__annotations__)
    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)} - own
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    groups = {
        "run": parser.add_argument_group("gastune: what to run"),
        "model": parser.add_argument_group("model and adapter"),
        "data": parser.add_argument_group("data"),
        "gast": parser.add_argument_group("GAST (--method gast, gast+ist)"),
        "baselines": parser.add_argument_group(
            "baselines (ist, rst, lisa, fisher, maxloss, gradnorm, greats)"
        ),
        "trainer": parser.add_argument_group(TRAINER_GROUP),
    }
    config = groups["run"].add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML file of option: value (any option below)",
        default=argparse.SUPPRESS,
    )
    for action in list(parser._actions):
        dest = action.dest
        if action is config or dest == "help":
            continue
        if dest == "method":
            action.help = method_help()
        if dest in model_fields:
            key = "model"
        elif dest in data_fields:
            key = "data"
        elif dest.startswith("gast_"):
            key = "gast"
        elif dest.startswith(_BASELINE_PREFIXES):
            key = "baselines"
        elif dest in trainer_fields:
            key = "trainer"
        else:
            key = "run"
        _move(parser, action, groups[key])
    first = ("config", "method", "output_dir")
    groups["run"]._group_actions.sort(key=lambda a: first.index(a.dest) if a.dest in first else len(first))
    # gastune's groups first (after the empty default ones), the Trainer's last
    parser._action_groups.sort(key=lambda group: group.title == TRAINER_GROUP)
    return parser


def _move(parser: argparse.ArgumentParser, action: argparse.Action, group) -> None:
    for old in parser._action_groups:
        if action in old._group_actions:
            old._group_actions.remove(action)
    group._group_actions.append(action)

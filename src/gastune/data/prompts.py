"""The LLM-Adapters commonsense prompt format shared by training and evaluation.

A record is ``{"instruction", "input", "output", "answer"}`` (plus ``"task"`` for the
commonsense mixture). ``output`` is ``"the correct answer is <label>"`` and ``answer`` is the
bare label; each task has a fixed label set (``TASK_LABELS``).
"""

from __future__ import annotations

from gastune.errors import GastuneError

ALPACA_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

# The label set of each of the eight commonsense tasks, in the order the instruction lists them.
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "siqa": ("answer1", "answer2", "answer3"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "arc_easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "arc_challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4"),
}
COMMONSENSE_TASKS: tuple[str, ...] = tuple(TASK_LABELS)

# "mc": LLM-Adapters (numbered choices, the response names a label); "rc": the question alone,
# the response states the option's text (gastune.data.commonsense builds both).
PROMPT_FORMATS: tuple[str, ...] = ("mc", "rc")


def check_prompt_format(prompt_format: str) -> None:
    """Raise a one-line ``GastuneError`` unless ``prompt_format`` is one of ``PROMPT_FORMATS``."""
    if prompt_format not in PROMPT_FORMATS:
        raise GastuneError(
            f"unknown prompt format '{prompt_format}' (choose from {', '.join(PROMPT_FORMATS)})"
        )


def default_rule(prompt_format: str) -> str:
    """How to rank a format's candidates: ``"mean"`` token log-prob for ``"rc"`` (option texts
    differ in length), ``"sum"`` for ``"mc"`` (labels are equally long).

    Example:
        >>> default_rule("rc"), default_rule("mc")
        ('mean', 'sum')
    """
    return "mean" if prompt_format == "rc" else "sum"


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca-style prompt up to and including ``### Response:\\n``."""
    if input_text:
        return (
            f"{ALPACA_HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n"
            f"### Input:\n{input_text}\n\n### Response:\n"
        )
    return f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def answer_text(label: str) -> str:
    """The target response for a label, as in the commonsense_170k records."""
    return f"the correct answer is {label}"

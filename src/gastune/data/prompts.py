"""The LLM-Adapters commonsense prompt format shared by training and evaluation.

A record is ``{"instruction", "input", "output", "answer"}`` (plus ``"task"`` for the
commonsense mixture). ``output`` is ``"the correct answer is <label>"`` and ``answer`` is the
bare label; each task has a fixed label set (``TASK_LABELS``).
"""

from __future__ import annotations

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

"""Label noise for the commonsense records: answers moved to a wrong option of the same question.

Experiment B of docs/experiments.md trains on data where a fixed share of the answers is
wrong. ``corrupt_labels`` picks exactly ``round(fraction × n)`` records of each task (so every
task carries the same share of noise), and moves each picked answer to another option of the
same question, drawn uniformly. Everything is seeded per task by a string seed, so the same
``seed`` corrupts the same records the same way, whatever other tasks are present.

The records keep their format: an ``mc`` record's response names the new label, an ``rc``
record's response states the new option's text. A corrupted record carries
``"clean_answer"`` (its true label), so the noise can be audited and reported.

Example:
    >>> rec = {"task": "piqa", "instruction": "Q", "input": "", "answer": "solution1",
    ...        "output": "the correct answer is solution1", "choices": ["a", "b"]}
    >>> noisy = corrupt_labels([rec] * 10, 0.3, seed=0)
    >>> sum(r["answer"] != "solution1" for r in noisy), noisy[0] is rec
    (3, False)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from gastune.data.prompts import TASK_LABELS, answer_text
from gastune.errors import GastuneError


def noisy_count(n: int, fraction: float) -> int:
    """How many of ``n`` records get a wrong answer: ``fraction × n`` rounded half up.

    Example:
        >>> noisy_count(96, 0.3), noisy_count(10, 0.25), noisy_count(5, 0.0)
        (29, 3, 0)
    """
    return math.floor(fraction * n + 0.5)


def check_fraction(fraction: float) -> None:
    """Raise a one-line error unless ``0 <= fraction < 1``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise GastuneError(f"label noise must be a fraction in [0, 1), got {fraction!r}")


def _wrong_answer(i: int, record: dict, rng: random.Random) -> dict:
    task = record.get("task")
    choices = record.get("choices")
    if task not in TASK_LABELS or not isinstance(choices, (list, tuple)) or len(choices) < 2:
        raise GastuneError(
            f"record {i}: label noise needs commonsense records (a known task and its choices)"
        )
    labels = TASK_LABELS[task][: len(choices)]
    if record.get("answer") not in labels:
        raise GastuneError(f"record {i}: answer {record.get('answer')!r} is not one of {labels}")
    gold = labels.index(record["answer"])
    # The response names the label (mc) or states the option's text (rc): keep that format.
    if record.get("output") == answer_text(labels[gold]):
        say = labels
    elif record.get("output") == answer_text(choices[gold]):
        say = choices
    else:
        raise GastuneError(f"record {i}: its output {record.get('output')!r} states neither label nor option")
    wrong = rng.choice([j for j in range(len(choices)) if j != gold])
    return {
        **record,
        "answer": labels[wrong],
        "output": answer_text(say[wrong]),
        "clean_answer": record["answer"],
    }


def corrupt_labels(records: Sequence[dict], fraction: float, seed: int = 0) -> list[dict]:
    """Copies of ``records`` with ``noisy_count(n_task, fraction)`` answers per task made wrong.

    Records keep their order; untouched ones are returned as shallow copies. See the module
    docstring for what a corrupted record looks like.
    """
    check_fraction(fraction)
    out = [dict(r) for r in records]
    if fraction == 0:
        return out
    by_task: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_task.setdefault(str(record.get("task")), []).append(i)
    for task, rows in by_task.items():
        rng = random.Random(f"{seed}:label-noise:{task}")
        for i in sorted(rng.sample(rows, noisy_count(len(rows), fraction))):
            out[i] = _wrong_answer(i, records[i], rng)
    return out

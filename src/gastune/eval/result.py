"""Evaluation results: per-record predictions and their per-task aggregation.

Pure data, no model: ``aggregate`` turns a list of ``Prediction`` into an ``EvalResult``
(accuracy per task and the unweighted mean over the tasks present, as in the LLM-Adapters
tables), and both round-trip through plain dicts for the results JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from gastune.data.prompts import COMMONSENSE_TASKS
from gastune.errors import GastuneError


@dataclass(frozen=True)
class Prediction:
    """The scored candidates of one record and the label chosen from them.

    ``sum_logprobs[i]`` is log p(candidate i | prompt) summed over its tokens and
    ``mean_logprobs[i]`` the same divided by its token count, in the order of ``labels``.
    The generation protocol scores no candidates: its predictions keep the generated text in
    ``response`` and have ``predicted=None`` when the response names no label (wrong).
    """

    index: int  # position of the record in the evaluated list
    task: str
    answer: str
    predicted: str | None
    labels: tuple[str, ...]
    sum_logprobs: tuple[float, ...] = ()
    mean_logprobs: tuple[float, ...] = ()
    response: str | None = None  # the generated text (generation protocol only)

    @property
    def correct(self) -> bool:
        return self.predicted == self.answer


@dataclass(frozen=True)
class TaskScore:
    """Accuracy of one task: ``correct`` of ``n`` records."""

    n: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass
class EvalResult:
    """Per-task accuracy, their unweighted average and the per-record predictions.

    Example:
        >>> result = aggregate(predictions)  # doctest: +SKIP
        >>> result.tasks["arc_easy"].accuracy, result.average  # doctest: +SKIP
        (0.48, 0.48)
    """

    tasks: dict[str, TaskScore]
    predictions: list[Prediction] = field(default_factory=list)
    rule: str = "sum"

    @property
    def average(self) -> float:
        """Unweighted mean of the task accuracies (each task counts once, whatever its n)."""
        if not self.tasks:
            return 0.0
        return sum(score.accuracy for score in self.tasks.values()) / len(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``from_dict`` reads it back."""
        return {
            "rule": self.rule,
            "average": self.average,
            "tasks": {
                task: {"n": s.n, "correct": s.correct, "accuracy": s.accuracy}
                for task, s in self.tasks.items()
            },
            "predictions": [asdict(p) for p in self.predictions],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """Rebuild a result from ``to_dict`` output (or a results JSON's ``"results"``)."""
        try:
            tasks = {t: TaskScore(n=int(s["n"]), correct=int(s["correct"])) for t, s in data["tasks"].items()}
            predictions = [
                Prediction(
                    **{
                        **p,
                        "labels": tuple(p["labels"]),
                        "sum_logprobs": tuple(p.get("sum_logprobs", ())),
                        "mean_logprobs": tuple(p.get("mean_logprobs", ())),
                    }
                )
                for p in data.get("predictions", [])
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise GastuneError(f"not an evaluation result: {exc!r}") from exc
        return cls(tasks=tasks, predictions=predictions, rule=data.get("rule", "sum"))


def task_order(tasks) -> list[str]:
    """The commonsense tasks in their canonical order, then any others alphabetically."""
    known = [t for t in COMMONSENSE_TASKS if t in tasks]
    return known + sorted(t for t in tasks if t not in COMMONSENSE_TASKS)


def aggregate(predictions: list[Prediction], rule: str = "sum") -> EvalResult:
    """Count correct predictions per task.

    Example:
        >>> p = Prediction(0, "boolq", "true", "true", ("true", "false"), (-1.0, -2.0), (-1.0, -2.0))
        >>> aggregate([p]).tasks["boolq"].accuracy
        1.0
    """
    counts: dict[str, list[int]] = {}
    for p in predictions:
        n_correct = counts.setdefault(p.task, [0, 0])
        n_correct[0] += 1
        n_correct[1] += int(p.correct)
    tasks = {t: TaskScore(n=counts[t][0], correct=counts[t][1]) for t in task_order(counts)}
    return EvalResult(tasks=tasks, predictions=list(predictions), rule=rule)

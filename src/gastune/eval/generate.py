"""The LLM-Adapters generation protocol: generate a response, read the first label in it.

For each record the prompt is ``format_prompt(instruction, input)``; the model generates up
to 32 new tokens, greedily (``num_beams=1``) or by beam search (the paper's tables use 4
beams), and the prediction is the first match of the record's label set in the response
(``r"answer1|answer2|answer3"`` ...). A response naming no label counts as wrong. Only the
labels the question states on its ``Answer format:`` line are searched for, so a 4-choice
ARC question never "predicts" ``answer5``.

Prompts run in batches, left-padded (a decoder-only model continues from the last column),
longest first; ``generate_responses`` returns the same tokens as generating one prompt at a
time (tests check this).

Example:
    >>> extract_label("the correct answer is answer2, not answer1", ("answer1", "answer2"))
    'answer2'
    >>> extract_label("I do not know", ("true", "false")) is None
    True
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from gastune.data.prompts import format_prompt
from gastune.data.tokens import leading_special_ids
from gastune.errors import GastuneError
from gastune.eval.loglik import _check_record as record_labels  # the stated-labels rule, shared
from gastune.eval.result import EvalResult, Prediction, aggregate

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 32


@functools.cache
def label_pattern(labels: tuple[str, ...]) -> re.Pattern:
    """A regex matching any of ``labels``; longer labels first, so none hides behind a prefix.

    Example:
        >>> label_pattern(("true", "false")).pattern
        'false|true'
    """
    if not labels:
        raise GastuneError("no labels to match")
    ordered = sorted(labels, key=lambda label: (-len(label), label))
    return re.compile("|".join(re.escape(label) for label in ordered))


def extract_label(response: str, labels: Sequence[str]) -> str | None:
    """The first of ``labels`` that occurs in ``response`` (by position), or ``None``.

    Case-sensitive, as LLM-Adapters' ``re.findall(r"true|false", ...)[0]``.

    Example:
        >>> extract_label("solution2 ... solution1", ("solution1", "solution2"))
        'solution2'
    """
    found = label_pattern(tuple(labels)).search(response)
    return found.group(0) if found else None


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` padded on the left, so that every prompt ends in the last column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _decode(tokenizer, new_tokens: torch.Tensor, eos_id: int | None, stop: str | None) -> str:
    """The text of one row's new tokens, up to its first EOS and its first ``stop`` string."""
    tokens = new_tokens.tolist()
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id)]  # after EOS come pad tokens
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return text.split(stop, 1)[0] if stop else text


def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    num_beams: int = 1,
    batch_size: int = 8,
    stop: str | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy or beam-search continuations of ``prompts``, batched with left padding.

    Args:
        prompts: full prompt texts (e.g. ``format_prompt(...)`` output).
        max_new_tokens: the most tokens generated per prompt (generation stops earlier at EOS).
        num_beams: 1 for greedy decoding, more for beam search.
        batch_size: prompts per ``generate`` call.
        stop: when given, generation of a row stops once it produced this string, and the
            response is cut before it (e.g. ``"###"``: a new Alpaca section is not an answer).
        progress: show a progress bar.

    Returns:
        One response per prompt, in order, without the prompt and special tokens.

    Example:
        >>> generate_responses(model, tok, [format_prompt("Say hi")])  # doctest: +SKIP
        ['Hi!']
    """
    if batch_size < 1 or num_beams < 1 or max_new_tokens < 1:
        raise GastuneError(
            f"batch_size, num_beams and max_new_tokens must be >= 1, got {batch_size}, {num_beams}, {max_new_tokens}"
        )
    lead = leading_special_ids(tokenizer)
    encoded = [lead + ids for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_id or 0)
    settings = {
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        # Explicit, so that a model's own generation_config (sampling, temperature) cannot apply.
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "pad_token_id": pad_id,
        "eos_token_id": eos_id,
    }
    if stop:
        settings.update(stop_strings=[stop], tokenizer=tokenizer)
    device = next(model.parameters()).device
    # Longest first: batches of similar length waste little padding, and the slowest batches
    # come first, so the progress bar's estimate errs on the long side.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    responses: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(order), disable=not progress, unit="q") as bar:
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                ids, mask = _left_pad([encoded[i] for i in idx], pad_id)
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **settings)
                for row, i in enumerate(idx):
                    responses[i] = _decode(tokenizer, out[row, ids.shape[1] :].cpu(), eos_id, stop)
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return responses


def evaluate_commonsense_generation(
    model,
    tokenizer,
    records: Sequence[dict],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    num_beams: int = 1,
    batch_size: int = 8,
    progress: bool = True,
) -> EvalResult:
    """Zero-shot commonsense accuracy by generation and first label match (LLM-Adapters).

    ``records`` are ``{"instruction", "input", "answer", "task"}`` dicts (``load_commonsense``
    output). Each prediction keeps its generated ``response``; ``predicted`` is ``None``
    when the response names none of the question's labels.

    Example:
        >>> records = load_commonsense("validation", tasks=["boolq"], per_task=50)  # doctest: +SKIP
        >>> result = evaluate_commonsense_generation(model, tokenizer, records, num_beams=4)  # doctest: +SKIP
        >>> result.tasks["boolq"].accuracy  # doctest: +SKIP
    """
    if not records:
        raise GastuneError("no records to evaluate")
    label_sets = [record_labels(i, r) for i, r in enumerate(records)]
    prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in records]
    logger.info("generating %d responses (%d beams, <= %d tokens)", len(prompts), num_beams, max_new_tokens)
    responses = generate_responses(
        model, tokenizer, prompts, max_new_tokens, num_beams, batch_size, progress=progress
    )
    predictions = [
        Prediction(
            index=i,
            task=record["task"],
            answer=record["answer"],
            predicted=extract_label(response, labels),
            labels=labels,
            response=response,
        )
        for i, (record, labels, response) in enumerate(zip(records, label_sets, responses))
    ]
    unmatched = sum(p.predicted is None for p in predictions)
    if unmatched:
        logger.info("%d of %d responses name no label (counted wrong)", unmatched, len(predictions))
    rule = "greedy" if num_beams == 1 else f"beam{num_beams}"
    return aggregate(predictions, rule=rule)

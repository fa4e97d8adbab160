"""Log-likelihood multiple-choice scoring of the commonsense tasks.

For each record the prompt is ``format_prompt(instruction, input)`` and every label of the
task is a candidate response ``answer_text(label)`` ("the correct answer is <label>"). A
candidate's score is the sum of the log-probabilities of its tokens given the prompt; the
prediction is the label with the highest sum (``rule="sum"``, the default: it is the model's
likelihood of the whole response; the label tokens are nearly always equally long, where the
length-normalised ``rule="mean"`` ranks the same). Ties go to the first label.

Why it is fast on a CPU: the candidates of one record differ only in their last token(s)
("... is answer1" vs "... is answer2"), so each record's longest common token prefix (the
prompt and the shared part of the responses) is run once, in batches of records (left-padded,
so that the positions whose logits are needed line up at the end and ``logits_to_keep`` skips
the 49k-wide output layer everywhere else). The tokens common to a whole batch (the Alpaca
header) run once for the batch. Only candidates with more than one token left after their
record's shared prefix run again, as short suffixes on a copy of the prefix's KV cache. With
the commonsense labels this is ~4x fewer tokens than one sequence per candidate.

Note: 0-shot, a small model ranks the label tokens mostly by a prior (SmolLM2-135M picks
"answer4" for nearly every ARC question), so "before fine-tuning" accuracies sit near the
majority-label rate. ``prompt_format="rc"`` ranks the options' texts instead (the candidates
then differ in more than their last tokens, and run as suffixes on the shared prefix's cache).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from gastune.data.prompts import TASK_LABELS, answer_text, check_prompt_format, format_prompt
from gastune.data.tokens import common_prefix, leading_special_ids
from gastune.errors import GastuneError
from gastune.eval.result import EvalResult, Prediction, aggregate

logger = logging.getLogger(__name__)

RULES = ("sum", "mean")
# Tokens all prompts of a batch must share before that part is run once for the batch.
_MIN_COMMON = 8


@dataclass(frozen=True)
class _Encoded:
    """Token ids of one prompt's candidates (prompt + candidate, jointly tokenised)."""

    seqs: list[list[int]]
    starts: list[int]  # index of each candidate's first token in its sequence
    shared: int  # length of the token prefix run once for all candidates (>= 1)


def _encode(tokenizer, prompt: str, candidates: Sequence[str], lead: list[int]) -> _Encoded:
    # Tokenise prompt+candidate jointly (as the model sees it in training) and find where the
    # candidate starts from the prompt alone; a token merging across the boundary counts as
    # part of the candidate.
    prompt_ids = lead + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    joint = tokenizer([prompt + c for c in candidates], add_special_tokens=False)["input_ids"]
    seqs = [lead + list(ids) for ids in joint]
    starts = [common_prefix(prompt_ids, s) for s in seqs]
    if min(starts) < 1:
        raise GastuneError("cannot score a candidate without a prompt token before it")
    if any(start == len(s) for start, s in zip(starts, seqs)):
        raise GastuneError(f"an empty candidate among {list(candidates)!r}")
    shared = min(seqs, key=len)
    for s in seqs:
        shared = shared[: common_prefix(shared, s)]
    # Every candidate keeps at least one token after the shared prefix, so that its first
    # scored token is predicted from the prefix's last position.
    return _Encoded(seqs, starts, min(len(shared), min(len(s) for s in seqs) - 1))


def _with_extra(encoded: _Encoded, ids: list[int], start: int) -> _Encoded | None:
    """``encoded`` plus one more scored sequence (tokens ``start..`` of ``ids``) that runs on
    the candidates' cached prefix; None where ``ids`` does not begin with that prefix."""
    shared = encoded.shared
    if start < 1 or len(ids) <= shared or list(ids[:shared]) != encoded.seqs[0][:shared]:
        return None
    return _Encoded([*encoded.seqs, list(ids)], [*encoded.starts, start], shared)


def _select_rows(cache, rows: torch.Tensor):
    """The KV cache with its batch rows replaced by ``rows`` (repeats allowed)."""
    if hasattr(cache, "reorder_cache"):  # transformers Cache objects (beam search uses this)
        cache.reorder_cache(rows)
        return cache
    return tuple(tuple(t.index_select(0, rows) for t in layer) for layer in cache)  # legacy tuples


def _pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of token lists padded to one width, on the left or on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def _run_prefixes(model, group: Sequence[_Encoded], pad_id: int, keep: int, use_cache: bool):
    """Run every prompt's shared prefix; return its last ``keep`` log-softmaxes, mask and cache.

    The tokens common to all prefixes of the group (the Alpaca header, ~30 tokens) run once
    and their cache is copied to every row. The rest is left-padded, so that every prefix ends
    in the last column and the ``keep`` positions whose logits are needed line up there.
    """
    device = next(model.parameters()).device
    # Stop the common part before the first position whose logits are needed.
    first_needed = min(min(min(e.starts) - 1, e.shared - 1) for e in group)
    common = min(common_prefix(group[0].seqs[0], e.seqs[0]) for e in group)
    common = min(common, first_needed)
    cache = None
    if common < _MIN_COMMON:
        common = 0
    else:
        header = torch.tensor([group[0].seqs[0][:common]], device=device)
        head = model(input_ids=header, use_cache=True, logits_to_keep=1)  # only its cache is used
        cache = _select_rows(head.past_key_values, torch.zeros(len(group), dtype=torch.long, device=device))
    ids, mask = _pad([e.seqs[0][common : e.shared] for e in group], pad_id, left=True)
    mask = torch.cat([torch.ones((len(group), common), dtype=torch.long), mask], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)[:, common:]  # padding holes do not count
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        past_key_values=cache,
        use_cache=use_cache or cache is not None,
        logits_to_keep=keep,
    )
    return out.logits.float().log_softmax(-1), mask, out.past_key_values  # (R, keep, V)


def _score_group(model, group: Sequence[_Encoded], pad_id: int) -> list[list[float]]:
    """Per candidate, the log-probability of each of its tokens, for a group of prompts."""
    device = next(model.parameters()).device
    # Positions whose logits are needed: from before the earliest candidate token to the end.
    keep = max(e.shared - min(min(e.starts) - 1, e.shared - 1) for e in group)
    needs_suffix = [
        (r, k) for r, e in enumerate(group) for k, s in enumerate(e.seqs) if len(s) - e.shared > 1
    ]
    prefix_logp, mask, cache = _run_prefixes(model, group, pad_id, keep, use_cache=bool(needs_suffix))

    suffix_logp = None
    suffix_row: dict[tuple[int, int], int] = {}
    if needs_suffix:
        # Run tokens shared..len-2 of each such candidate on its prompt's cache; their logits
        # predict tokens shared+1..len-1 (token `shared` comes from the prefix's last logits).
        rows = torch.tensor([r for r, _ in needs_suffix])
        sids, smask = _pad(
            [group[r].seqs[k][group[r].shared : -1] for r, k in needs_suffix], pad_id, left=False
        )
        spos = torch.tensor([group[r].shared for r, _ in needs_suffix]).unsqueeze(1) + torch.arange(
            sids.shape[1]
        )
        out = model(
            input_ids=sids.to(device),
            attention_mask=torch.cat([mask[rows], smask], dim=1).to(device),
            position_ids=spos.to(device),
            past_key_values=_select_rows(cache, rows.to(device)),
            use_cache=True,
        )
        suffix_logp = out.logits.float().log_softmax(-1)  # (C, span, V)
        suffix_row = {rk: c for c, rk in enumerate(needs_suffix)}

    # Token t of a sequence is predicted by the logits at position t - 1.
    token_logps: list[list[float]] = []
    for r, e in enumerate(group):
        for k, (seq, start) in enumerate(zip(e.seqs, e.starts)):
            pre = [t for t in range(start, len(seq)) if t <= e.shared]
            post = [t for t in range(start, len(seq)) if t > e.shared]
            values = []
            if pre:
                values = prefix_logp[
                    r, [keep - e.shared + t - 1 for t in pre], [seq[t] for t in pre]
                ].tolist()
            if post:
                c = suffix_row[(r, k)]
                values += suffix_logp[c, [t - 1 - e.shared for t in post], [seq[t] for t in post]].tolist()
            token_logps.append(values)
    return token_logps


def score_candidates(
    model,
    tokenizer,
    items: Sequence[tuple[str, Sequence[str]]],
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[list[float]]]:
    """Log-probabilities of each candidate's tokens given its prompt, batched.

    ``items`` are ``(prompt, candidates)`` pairs; the result has, per item and candidate,
    the list of log p(token | prompt, earlier candidate tokens). The model is put in eval
    mode under ``torch.inference_mode`` and its training mode restored afterwards.

    Example:
        >>> lp = score_candidates(model, tok, [("2+2=", ["4", "5"])])  # doctest: +SKIP
        >>> [sum(c) for c in lp[0]]  # doctest: +SKIP
        [-1.2, -3.4]
    """
    if batch_size < 1:
        raise GastuneError(f"batch_size must be >= 1, got {batch_size}")
    lead = leading_special_ids(tokenizer)
    encoded = [_encode(tokenizer, prompt, cands, lead) for prompt, cands in items]
    return _score_encoded(model, tokenizer, encoded, batch_size, progress)


def _score_encoded(
    model, tokenizer, encoded: list[_Encoded], batch_size: int, progress: bool
) -> list[list[list[float]]]:
    """Per encoded prompt and sequence, the log-probabilities of its scored tokens."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Longest prompts first: batches of similar length waste little padding, and the first
    # (slowest) batches make the progress bar's estimate pessimistic rather than optimistic.
    order = sorted(range(len(encoded)), key=lambda i: -encoded[i].shared)
    results: list[list[list[float]]] = [[] for _ in encoded]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(order), disable=not progress, unit="q") as bar:
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                flat = iter(_score_group(model, [encoded[i] for i in idx], pad_id))
                for i in idx:
                    results[i] = [next(flat) for _ in encoded[i].seqs]
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return results


def _candidates(i: int, record: dict, labels: tuple[str, ...], prompt_format: str) -> list[str]:
    """The responses to rank: one per label ("mc") or one per option text ("rc")."""
    if prompt_format == "mc":
        return [answer_text(label) for label in labels]
    choices = record.get("choices")
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) and c.strip() for c in choices):
        raise GastuneError(f"record {i}: prompt format 'rc' needs a 'choices' list of option texts")
    if len(choices) != len(labels):
        raise GastuneError(f"record {i}: {len(choices)} choices for the {len(labels)} labels {labels}")
    return [answer_text(c) for c in choices]


def _check_record(i: int, record: dict) -> tuple[str, ...]:
    for key in ("instruction", "answer", "task"):
        if key not in record:
            raise GastuneError(f"record {i} has no '{key}' field")
    labels = TASK_LABELS.get(record["task"])
    if labels is None:
        raise GastuneError(f"record {i}: unknown task '{record['task']}' (known: {', '.join(TASK_LABELS)})")
    # A question with fewer choices than its task's maximum (3- or 4-choice ARC) lists its own
    # labels on the instruction's "Answer format:" line: score only those.
    stated = record["instruction"].rstrip().rsplit("Answer format:", 1)
    if len(stated) == 2:
        own = tuple(label.strip() for label in stated[1].split("/"))
        if own and set(own) <= set(labels):
            labels = own
    elif isinstance(record.get("choices"), (list, tuple)) and 2 <= len(record["choices"]) <= len(labels):
        labels = labels[: len(record["choices"])]  # an "rc" record lists no labels: its choices count
    if record["answer"] not in labels:
        raise GastuneError(f"record {i}: answer '{record['answer']}' is not one of {labels}")
    return labels


def _check_finite(scored: list[list[list[float]]]) -> None:
    """NaN log-probabilities (broken weights) would make the first label win every question
    and look like a real accuracy: refuse to score instead."""
    bad = [i for i, cands in enumerate(scored) if not all(math.isfinite(x) for lp in cands for x in lp)]
    if bad:
        raise GastuneError(
            f"the model gave non-finite log-probabilities for {len(bad)} of {len(scored)} questions "
            f"(first: record {bad[0]}): its weights are broken (NaN/inf), so no accuracy can be given"
        )


def evaluate_commonsense(
    model,
    tokenizer,
    records: Sequence[dict],
    batch_size: int = 16,
    progress: bool = True,
    rule: str = "sum",
    prompt_format: str = "mc",
) -> EvalResult:
    """Zero-shot multiple-choice accuracy on commonsense records by log-likelihood.

    ``records`` are ``{"instruction", "input", "answer", "task"}`` dicts (``load_commonsense``
    output); ``rule`` picks the label by summed (default) or mean token log-probability.
    ``prompt_format="mc"`` ranks the responses naming each label; ``"rc"`` ranks the
    responses stating each option's text (records from ``load_commonsense(...,
    prompt_format="rc")``, which carry ``choices``; use ``rule="mean"``: texts differ in length).

    Example:
        >>> from gastune.data.commonsense import load_commonsense  # doctest: +SKIP
        >>> records = load_commonsense("validation", tasks=["arc_easy"], per_task=50)  # doctest: +SKIP
        >>> result = evaluate_commonsense(model, tokenizer, records)  # doctest: +SKIP
        >>> result.tasks["arc_easy"].accuracy, result.average  # doctest: +SKIP
    """
    items, label_sets = _ranking_items(records, rule, prompt_format)
    scored = score_candidates(model, tokenizer, items, batch_size=batch_size, progress=progress)
    return _predict(records, label_sets, scored, rule)


def evaluate_commonsense_and_nll(
    model,
    tokenizer,
    records: Sequence[dict],
    batch_size: int = 16,
    progress: bool = True,
    rule: str = "sum",
    prompt_format: str = "mc",
):
    """``evaluate_commonsense`` and ``gastune.eval.nll.gold_response_nll`` in one pass.

    Each record's gold training sequence (prompt + ``output`` + EOS, tokenised as
    ``tokenize_records`` does) is scored as one more sequence on its prompt's cached prefix,
    next to the candidates, instead of by a separate forward pass of the whole sequence.
    Where its tokens do not begin with the candidates' shared prefix (a tokenisation that
    differs at the boundary), that record falls back to the separate pass; ``GoldNll.folded``
    counts the records scored in the ranking's pass. Returns ``(EvalResult, GoldNll)``; the
    accuracies are those of ``evaluate_commonsense`` and the NLLs those of
    ``gold_response_nll``, up to float rounding.

    Example:
        >>> result, nll = evaluate_commonsense_and_nll(model, tokenizer, records)  # doctest: +SKIP
        >>> result.average, nll.mean, nll.folded  # doctest: +SKIP
    """
    from gastune.eval.nll import GoldNll, gold_rows, score_rows

    if batch_size < 1:
        raise GastuneError(f"batch_size must be >= 1, got {batch_size}")
    items, label_sets = _ranking_items(records, rule, prompt_format)
    rows = gold_rows(records, tokenizer)
    lead = leading_special_ids(tokenizer)
    encoded = []
    for (prompt, cands), (ids, start) in zip(items, rows):
        plain = _encode(tokenizer, prompt, cands, lead)
        encoded.append(_with_extra(plain, ids, start) or plain)
    scored = _score_encoded(model, tokenizer, encoded, batch_size, progress)
    folded = [len(e.seqs) > len(cands) for e, (_, cands) in zip(encoded, items)]
    nll = [-math.fsum(lp[-1]) if f else 0.0 for lp, f in zip(scored, folded)]
    rest = [i for i, f in enumerate(folded) if not f]
    if rest:
        logger.info(
            "%d of %d gold responses do not share their prompt's tokens: separate pass", len(rest), len(rows)
        )
        for i, value in zip(rest, score_rows(model, tokenizer, [rows[i] for i in rest], batch_size)):
            nll[i] = value
    scored = [lp[: len(cands)] for lp, (_, cands) in zip(scored, items)]
    gold = GoldNll(
        nll=tuple(nll),
        tokens=tuple(len(ids) - start for ids, start in rows),
        tasks=tuple(str(r.get("task", "")) for r in records),
        folded=len(rows) - len(rest),
    )
    return _predict(records, label_sets, scored, rule), gold


def _ranking_items(records: Sequence[dict], rule: str, prompt_format: str):
    """The ``(prompt, candidates)`` to rank and each record's labels, checked."""
    if rule not in RULES:
        raise GastuneError(f"unknown rule '{rule}' (choose from {', '.join(RULES)})")
    check_prompt_format(prompt_format)
    if not records:
        raise GastuneError("no records to evaluate")
    label_sets = [_check_record(i, r) for i, r in enumerate(records)]
    items = [
        (format_prompt(r["instruction"], r.get("input", "")), _candidates(i, r, labels, prompt_format))
        for i, (r, labels) in enumerate(zip(records, label_sets))
    ]
    logger.info("scoring %d records, %d candidates", len(items), sum(len(c) for _, c in items))
    return items, label_sets


def _predict(records, label_sets, scored: list[list[list[float]]], rule: str) -> EvalResult:
    _check_finite(scored)
    predictions = []
    for i, (record, labels, token_logps) in enumerate(zip(records, label_sets, scored)):
        sums = tuple(sum(lp) for lp in token_logps)
        means = tuple(sum(lp) / len(lp) for lp in token_logps)
        ranked = sums if rule == "sum" else means
        best = max(range(len(labels)), key=ranked.__getitem__)  # first maximum on ties
        predictions.append(Prediction(i, record["task"], record["answer"], labels[best], labels, sums, means))
    return aggregate(predictions, rule=rule)

"""Held-out NLL of the gold response: the training loss, measured on evaluation questions.

For each record the sequence is exactly what training builds (``tokenize_records``: the
Alpaca prompt + the record's ``output`` + EOS, tokenised jointly, loss on the response only),
never truncated, and one forward pass scores all of it. A question's NLL is
−log p(response tokens and EOS | prompt) in nats; ``GoldNll.mean`` averages the per-token
value (the question's training loss) over the questions, so it reads on the scale of the
train loss curves. Both the sum and the token count are kept per question, so paired
comparisons between runs can be made question by question.

Why this is the primary metric of the issue-16 experiments: accuracy on 800 questions moves in
steps of 1/800 and flips on near-ties, while the gold response's likelihood moves continuously
with what training changed. It costs one forward pass of each whole sequence (the option
ranking shares each prompt among its candidates, so it is not a bound on this cost).

Batches are left-padded so that every response ends in the last column, and
``logits_to_keep`` skips the vocabulary-wide output layer on the prompt positions.

``gastune.eval.loglik.evaluate_commonsense_and_nll`` computes the same values inside the option
ranking's pass: the gold sequence is one more scored sequence on its prompt's cached prefix,
wherever its tokens begin with that prefix (else it falls back to this module's pass).

Example:
    >>> from gastune.data.commonsense import load_commonsense  # doctest: +SKIP
    >>> records = load_commonsense("validation", per_task=100, seed=1234, prompt_format="rc")  # doctest: +SKIP
    >>> gold_response_nll(model, tokenizer, records).mean  # doctest: +SKIP
    0.62
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from gastune.data.collate import IGNORE_INDEX, tokenize_records
from gastune.errors import GastuneError

# No truncation: a cut response would score fewer tokens than its question has.
_NO_CUTOFF = 1 << 30


@dataclass(frozen=True)
class GoldNll:
    """Per question (in the records' order): summed NLL of the response + EOS, its tokens, task."""

    nll: tuple[float, ...]
    tokens: tuple[int, ...]
    tasks: tuple[str, ...]
    # Questions scored within the option ranking's pass (None: all by their own forward pass).
    folded: int | None = None

    @property
    def per_token(self) -> list[float]:
        """Each question's NLL per response token (its training loss)."""
        return [s / n for s, n in zip(self.nll, self.tokens)]

    @property
    def mean(self) -> float:
        """Mean over questions of the per-token NLL (the primary metric)."""
        return statistics.fmean(self.per_token)

    def by_task(self) -> dict[str, float]:
        """Mean per-token NLL of each task's questions."""
        groups: dict[str, list[float]] = {}
        for task, value in zip(self.tasks, self.per_token):
            groups.setdefault(task, []).append(value)
        return {task: statistics.fmean(values) for task, values in groups.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "tasks": self.by_task(),
            "nll": list(self.nll),
            "tokens": list(self.tokens),
            "folded": self.folded,
        }


def _batch_nll(model, rows: Sequence[tuple[list[int], int]], pad_id: int) -> list[float]:
    """Summed NLL of tokens ``start..`` of each ``(ids, start)`` row, one forward pass."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in rows)
    # Logits at index t predict token t + 1: from start - 1 on; left padding aligns the ends.
    keep = max(len(ids) - start + 1 for ids, start in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, _) in enumerate(rows):
        input_ids[r, width - len(ids) :] = torch.tensor(ids)
        mask[r, width - len(ids) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        logits_to_keep=keep,
    ).logits
    logp = logits.float().log_softmax(-1)  # (R, keep, V)
    out = []
    for r, (ids, start) in enumerate(rows):
        cols = [keep - len(ids) + t - 1 for t in range(start, len(ids))]
        out.append(-logp[r, cols, ids[start:]].sum().item())
    return out


def gold_rows(records: Sequence[dict], tokenizer) -> list[tuple[list[int], int]]:
    """Each record's training sequence and the index of its first response token.

    ``(ids, start)``: ``ids`` is exactly what ``tokenize_records`` trains on (prompt + gold
    output + EOS, tokenised jointly, never truncated); tokens ``start..`` are scored.
    """
    if not records:
        raise GastuneError("no records to score")
    items = tokenize_records(records, tokenizer, cutoff_len=_NO_CUTOFF, train_on_prompt=False)
    if len(items) != len(records):  # cannot happen without a cutoff; guards the pairing by index
        raise GastuneError(f"{len(records) - len(items)} records kept no response token")
    rows = []
    for item in items:
        labels = item["labels"]
        start = next(t for t, label in enumerate(labels) if label != IGNORE_INDEX)
        if start < 1:
            raise GastuneError("cannot score a response without a prompt token before it")
        rows.append((item["input_ids"], start))
    return rows


def score_rows(
    model, tokenizer, rows: Sequence[tuple[list[int], int]], batch_size: int = 16, progress: bool = False
) -> list[float]:
    """Summed NLL of tokens ``start..`` of each ``(ids, start)`` row: one forward pass per row,
    in batches of similar length, in eval mode under ``torch.inference_mode``."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths together
    nll = [0.0] * len(rows)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(order), disable=not progress, unit="q") as bar:
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                for i, value in zip(idx, _batch_nll(model, [rows[i] for i in idx], pad_id)):
                    nll[i] = value
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return nll


def gold_response_nll(
    model, tokenizer, records: Sequence[dict], batch_size: int = 16, progress: bool = False
) -> GoldNll:
    """The NLL of each record's gold response (``output``) given its prompt, as trained.

    ``records`` are commonsense records (``load_commonsense``) or any schema that
    ``normalize_record`` accepts. The model runs in eval mode under ``torch.inference_mode``;
    its training mode is restored afterwards. (``gastune.eval.loglik.evaluate_commonsense_and_nll``
    gives the same values from the option ranking's pass, without this one.)
    """
    if batch_size < 1:
        raise GastuneError(f"batch_size must be >= 1, got {batch_size}")
    rows = gold_rows(records, tokenizer)
    nll = score_rows(model, tokenizer, rows, batch_size=batch_size, progress=progress)
    return GoldNll(
        nll=tuple(nll),
        tokens=tuple(len(ids) - start for ids, start in rows),
        tasks=tuple(str(r.get("task", "")) for r in records),
    )

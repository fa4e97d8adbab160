"""Tokenise prompt/completion and chat records for causal-LM training and pad them into batches.

A training sequence is ``prompt + completion + EOS``, tokenised jointly (as the log-likelihood
evaluator does), so a token that merges across the prompt/completion boundary counts as part
of the completion. ``labels`` equal ``input_ids`` (loss over prompt and answer, as in
LLM-Adapters) or carry -100 on prompt tokens with ``train_on_prompt=False``. Chat records are
rendered by the model's chat template (``gastune.data.chat``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from gastune.data.chat import chat_token_labels, is_chat
from gastune.data.io import normalize_record
from gastune.data.tokens import IGNORE_INDEX, common_prefix, leading_special_ids
from gastune.errors import GastuneError

logger = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "CausalLMCollator", "TokenizedDataset", "tokenize_records"]

_SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels")


def tokenize_records(
    records: Sequence[Mapping],
    tokenizer,
    cutoff_len: int = 1024,
    train_on_prompt: bool = True,
    chat_loss: str = "assistant",
) -> list[dict]:
    """``input_ids`` / ``attention_mask`` / ``labels`` lists for each record, cut to ``cutoff_len``.

    ``records`` are ``{"prompt", "completion"}`` dicts (``load_records``) or any schema that
    ``normalize_record`` accepts (e.g. ``load_commonsense`` records, trl's chat formats). Chat
    records are rendered by the tokenizer's chat template and train on their assistant turns
    (``chat_loss="assistant"``) or on every token (``"all"``); ``train_on_prompt`` applies to
    the other records. A record whose answer (completion, or assistant turns) loses every
    token to ``cutoff_len`` is dropped, with a logged count: it would train on its prompt only.

    Example:
        >>> items = tokenize_records([{"prompt": "Q: 2+2?\\nA: ", "completion": "4"}], tokenizer)  # doctest: +SKIP
        >>> items[0]["labels"][-1] == tokenizer.eos_token_id  # doctest: +SKIP
        True
    """
    if cutoff_len < 2:
        raise GastuneError(f"cutoff_len must be at least 2, got {cutoff_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise GastuneError("the tokenizer has no EOS token, which ends every training sequence")
    normalised = [
        r
        if isinstance(r, Mapping)
        and isinstance(r.get("prompt"), str)
        and isinstance(r.get("completion"), str)
        else normalize_record(r, f"record {i + 1}")
        for i, r in enumerate(records)
    ]
    if not normalised:
        raise GastuneError("no records to tokenize")
    sequences = _text_sequences(normalised, tokenizer, eos, train_on_prompt)
    for i, r in enumerate(normalised):
        if is_chat(r):
            ids, labels, target = chat_token_labels(r, tokenizer, chat_loss, f"record {i + 1}")
            sequences[i] = (ids, labels, target.index(True) if True in target else len(ids))
    items, truncated, no_target = [], 0, 0
    for ids, labels, start in sequences:
        if len(ids) > cutoff_len:
            truncated += 1
            ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        if start >= len(ids):  # no answer token left: it would train on its prompt alone
            no_target += 1
            continue
        items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if truncated:
        logger.info(
            "%d of %d records were cut to cutoff_len=%d tokens", truncated, len(normalised), cutoff_len
        )
    if no_target:
        logger.warning(
            "%d of %d records lost every completion token to cutoff_len=%d; dropped them "
            "(raise cutoff_len to keep them)",
            no_target,
            len(normalised),
            cutoff_len,
        )
    if not items:
        raise GastuneError(f"no record keeps a completion token within cutoff_len={cutoff_len}; raise it")
    return items


def _text_sequences(records: Sequence[Mapping], tokenizer, eos: int, train_on_prompt: bool) -> list:
    """``(ids, labels, answer_start)`` of each prompt/completion record (``None`` for chat records).

    A sequence is ``leading specials + prompt + completion + EOS``, tokenised jointly; the
    answer starts where the joint tokens part from those of the prompt alone.
    """
    out: list = [None] * len(records)
    text = [i for i, r in enumerate(records) if not is_chat(r)]
    if not text:
        return out
    lead = leading_special_ids(tokenizer)
    prompts = tokenizer([records[i]["prompt"] for i in text], add_special_tokens=False)["input_ids"]
    fulls = tokenizer(
        [records[i]["prompt"] + records[i]["completion"] for i in text], add_special_tokens=False
    )["input_ids"]
    for i, prompt_ids, full_ids in zip(text, prompts, fulls):
        ids = [*lead, *full_ids, eos]
        start = len(lead) + common_prefix(prompt_ids, full_ids)
        labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * start + ids[start:]
        out[i] = (ids, labels, start)
    return out


class CausalLMCollator:
    """Right-pad tokenised features into a batch of tensors (pads: mask 0, label -100).

    Features need ``input_ids``; ``attention_mask`` defaults to ones and ``labels`` to a copy
    of ``input_ids``. Other keys pass through: numbers (e.g. the ``index`` of
    ``TokenizedDataset`` items) as a tensor, anything else as a list.

    Example:
        >>> collate = CausalLMCollator(tokenizer)  # doctest: +SKIP
        >>> batch = collate([{"input_ids": [5, 6, 7], "index": 0}, {"input_ids": [8], "index": 1}])  # doctest: +SKIP
        >>> batch["labels"].tolist(), batch["index"].tolist()  # doctest: +SKIP
        ([[5, 6, 7], [8, -100, -100]], [0, 1])
    """

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise GastuneError("the tokenizer has neither a pad nor an EOS token to pad batches with")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise GastuneError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping]) -> dict:
        if not features:
            raise ValueError("cannot collate an empty batch")
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(features)
        input_ids = torch.full((batch_size, width), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)  # (B, T)
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for row, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            n = ids.numel()
            input_ids[row, :n] = ids
            mask = feature.get("attention_mask")
            attention_mask[row, :n] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long)
            target = feature.get("labels")
            labels[row, :n] = ids if target is None else torch.as_tensor(target, dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key in features[0]:
            if key in _SEQUENCE_KEYS:
                continue
            if any(key not in f for f in features):
                raise ValueError(f"feature key '{key}' is missing from some features of the batch")
            batch[key] = _stack_extra([f[key] for f in features])
        return batch


def _stack_extra(values: list):
    if all(isinstance(v, (bool, int, float)) for v in values):
        return torch.tensor(values)
    if all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in values):
        return torch.stack(values)
    return values


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenised items whose ``__getitem__`` adds their position as ``"index"``.

    The index lets a trainer tie per-sample quantities (losses, gradients) back to items.

    Example:
        >>> data = TokenizedDataset([{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [1, 2]}])
        >>> len(data), data[0]["index"]
        (1, 0)
    """

    def __init__(self, items: Sequence[Mapping]):
        self._items = list(items)

    @classmethod
    def from_records(
        cls,
        records: Sequence[Mapping],
        tokenizer,
        cutoff_len: int = 1024,
        train_on_prompt: bool = True,
        chat_loss: str = "assistant",
    ) -> TokenizedDataset:
        """Tokenise ``records`` (see ``tokenize_records``) into a dataset.

        Example:
            >>> ds = TokenizedDataset.from_records([{"prompt": "2+2=", "completion": "4"}], tokenizer)  # doctest: +SKIP
        """
        return cls(
            tokenize_records(
                records,
                tokenizer,
                cutoff_len=cutoff_len,
                train_on_prompt=train_on_prompt,
                chat_loss=chat_loss,
            )
        )

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        index = range(len(self._items))[index]  # negative indices work; out of range raises IndexError
        return {**self._items[index], "index": index}

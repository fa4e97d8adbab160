"""Token-level helpers shared by training collation and log-likelihood scoring."""

from __future__ import annotations

from collections.abc import Sequence

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text (e.g. BOS); trailing ones (EOS) are not kept."""
    with_special = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i : i + len(plain)] == plain:
            return list(with_special[:i])
    return []


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences.

    Prompt and prompt+answer are tokenised jointly; where their tokens part is where the
    answer's tokens begin (a merge across the boundary moves it left).
    """
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

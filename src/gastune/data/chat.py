"""Chat data in trl's conversational formats, formatted by the model's own chat template.

Two record shapes are accepted, as in trl's ``SFTTrainer``:

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation, optionally opening
  with a system turn, with any number of user/assistant turns;
- ``{"prompt": [messages], "completion": [messages]}``: conversational prompt/completion.

Roles are ``system``, ``user`` and ``assistant``. By default the loss is on the assistant
turns only (for prompt/completion: the assistant turns of the completion), each turn's tokens
from the first after the template's assistant header up to and including its end-of-turn
marker, so the model learns to stop. ``loss="all"`` trains on every token of the rendered
conversation.

Where a turn's tokens start and end is found by rendering the conversation up to that turn
(with and without the assistant header) and tokenising: the rendered prefix must be a prefix
of the whole rendering, which holds for ordinary templates; one that is not gets a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gastune.data.tokens import IGNORE_INDEX, common_prefix
from gastune.errors import GastuneError

__all__ = ["CHAT_LOSSES", "ROLES", "chat_token_labels", "check_chat_template", "is_chat", "normalize_chat"]

ROLES: tuple[str, ...] = ("system", "user", "assistant")
CHAT_LOSSES: tuple[str, ...] = ("assistant", "all")


def is_chat(record: Mapping) -> bool:
    """Whether ``record`` is in a conversational format (``messages``, or message-list prompt/completion)."""
    return record.get("messages") is not None or any(
        isinstance(record.get(key), list) for key in ("prompt", "completion")
    )


def normalize_chat(record: Mapping, where: str = "record") -> dict:
    """Validate a conversational record; return it as ``{"messages"}`` or ``{"prompt", "completion"}``
    with each message reduced to ``{"role", "content"}`` (``task``/``answer`` kept when present).

    Example:
        >>> normalize_chat({"messages": [{"role": "user", "content": "Hi"},
        ...                              {"role": "assistant", "content": "Hello!"}]})
        {'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]}
    """
    if record.get("messages") is not None:
        extra = [k for k in ("prompt", "completion") if record.get(k) is not None]
        if extra:
            raise GastuneError(f"{where}: has both 'messages' and '{extra[0]}'; use one chat format")
        messages = _messages(record["messages"], "messages", where)
        _need_assistant(messages, "messages", where)
        out: dict[str, Any] = {"messages": messages}
    else:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), list):
                raise GastuneError(
                    f"{where}: field '{key}' must be a list of messages (conversational prompt/completion "
                    f"has both as lists), got {_type_name(record.get(key))}"
                )
        prompt = _messages(record["prompt"], "prompt", where)
        completion = _messages(record["completion"], "completion", where)
        _need_assistant(completion, "completion", where)
        out = {"prompt": prompt, "completion": completion}
    for key in ("task", "answer"):
        if record.get(key) is not None:
            if not isinstance(record[key], str):
                raise GastuneError(f"{where}: field '{key}' must be a string, got {_type_name(record[key])}")
            out[key] = record[key]
    return out


def check_chat_template(tokenizer) -> None:
    """Raise a one-line error unless the tokenizer carries a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise GastuneError(
            f"the tokenizer of '{name}' has no chat template, so chat records cannot be formatted; "
            "use a chat model (one that ships a template) or give the data as prompt/completion strings"
        )


def chat_token_labels(record: Mapping, tokenizer, loss: str = "assistant", where: str = "record"):
    """``(input_ids, labels, target)`` of a normalised chat record rendered by ``tokenizer``'s template.

    ``labels`` hold -100 outside the trained tokens (the assistant turns for ``loss="assistant"``,
    nothing for ``"all"``); ``target`` marks the assistant tokens in either mode, so a caller
    can tell whether a cut left any answer token.
    """
    if loss not in CHAT_LOSSES:
        raise GastuneError(f"unknown chat loss '{loss}' (choose from {', '.join(CHAT_LOSSES)})")
    check_chat_template(tokenizer)
    if "messages" in record:
        messages, first_target = list(record["messages"]), 0
    else:
        messages, first_target = [*record["prompt"], *record["completion"]], len(record["prompt"])
    full = _render(tokenizer, messages, False, where)
    ids = _ids(tokenizer, full)
    target = [False] * len(ids)
    for i in range(first_target, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        try:
            start = _boundary(tokenizer, messages[:i], True, full, ids, where)
            end = (
                len(ids)
                if i == len(messages) - 1
                else _boundary(tokenizer, messages[: i + 1], False, full, ids, where)
            )
        except _NotAPrefix:
            if loss == "all":  # no turn boundaries needed: the whole conversation is the target
                target = [True] * len(ids)
                break
            raise GastuneError(
                f"{where}: the model's chat template does not render the conversation before turn {i + 1} "
                "as a prefix of the whole, so the assistant tokens cannot be located; use --chat_loss all"
            ) from None
        target[start:end] = [True] * (end - start)
    labels = list(ids) if loss == "all" else [t if keep else IGNORE_INDEX for t, keep in zip(ids, target)]
    return ids, labels, target


class _NotAPrefix(Exception):
    """The template renders a conversation's beginning differently from the whole."""


def _boundary(tokenizer, prefix: list, header: bool, full: str, ids: list[int], where: str) -> int:
    """Token index in ``ids`` where the rendering of ``prefix`` ends (a token merging across it moves left)."""
    text = _render(tokenizer, prefix, header, where) if prefix else ""
    if not full.startswith(text):
        raise _NotAPrefix
    return common_prefix(_ids(tokenizer, text), ids) if text else 0


def _render(tokenizer, messages: list, add_generation_prompt: bool, where: str) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except (TemplateError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GastuneError(f"{where}: the model's chat template refused this conversation: {first}") from exc


def _ids(tokenizer, text: str) -> list[int]:
    # The template writes any BOS itself; adding special tokens again would double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _messages(value: Any, field: str, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise GastuneError(
            f"{where}: field '{field}' must be a list of {{role, content}} messages, got {_type_name(value)}"
        )
    if not value:
        raise GastuneError(f"{where}: field '{field}' is an empty list of messages")
    out = []
    for j, message in enumerate(value, start=1):
        at = f"{where}: {field}[{j}]"
        if not isinstance(message, Mapping):
            raise GastuneError(f"{at} must be an object with 'role' and 'content', got {_type_name(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise GastuneError(f"{at}: 'role' must be a string, got {_type_name(role)}")
        if role not in ROLES:
            raise GastuneError(f"{at}: unknown role '{role}' (expected {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise GastuneError(
                f"{at}: 'content' of the {role} turn must be a string, got {_type_name(content)}"
            )
        if not content.strip():
            raise GastuneError(f"{at}: the {role} turn has empty content")
        out.append({"role": role, "content": content})
    return out


def _need_assistant(messages: Sequence[Mapping], field: str, where: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise GastuneError(f"{where}: no assistant turn in '{field}', so there is nothing to train on")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__

"""The held-out NLL of the gold response against a per-question manual computation."""

from __future__ import annotations

import pytest
import torch

from gastune.data.prompts import answer_text, format_prompt
from gastune.errors import GastuneError
from gastune.eval.nll import gold_response_nll
from gastune.models.loading import load_tokenizer
from tests.conftest import tiny_llama_for


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama_for(tokenizer, hidden_size=64, initializer_range=0.2).eval()


RECORDS = [
    {"instruction": "Is water wet?", "input": "", "output": answer_text("true"), "task": "boolq"},
    {
        "instruction": "Please choose the correct solution to the question: open a jar",
        "input": "",
        "output": answer_text("twist the lid slowly until it comes off"),
        "task": "piqa",
    },
    {"instruction": "Fill in: the cat sat on the _", "input": "a mat", "output": "mat", "task": "winogrande"},
]


def manual_nll(model, tokenizer, record) -> tuple[float, int]:
    """One question, one unpadded sequence: prompt + output + EOS, sum of -log p over the response."""
    prompt = format_prompt(record["instruction"], record["input"])
    bos = tokenizer("x")["input_ids"][: -len(tokenizer("x", add_special_tokens=False)["input_ids"])]
    prompt_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = bos + tokenizer(prompt + record["output"], add_special_tokens=False)["input_ids"]
    ids.append(tokenizer.eos_token_id)
    start = len(prompt_ids)
    assert ids[:start] == prompt_ids  # these prompts end in a newline: no token merges across it
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return -sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids))), len(ids) - start


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_matches_one_question_at_a_time(model, tokenizer, batch_size):
    result = gold_response_nll(model, tokenizer, RECORDS, batch_size=batch_size)
    expected = [manual_nll(model, tokenizer, r) for r in RECORDS]
    for got, tokens, (want, want_tokens) in zip(result.nll, result.tokens, expected):
        assert tokens == want_tokens
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    per_token = [s / n for s, n in expected]
    assert result.mean == pytest.approx(sum(per_token) / 3, rel=1e-4)
    assert result.by_task()["piqa"] == pytest.approx(per_token[1], rel=1e-4)
    assert all(v > 0 for v in result.nll) and not model.training


def test_training_mode_is_restored_and_dict_round_trip(model, tokenizer):
    model.train()
    try:
        scored = gold_response_nll(model, tokenizer, RECORDS[:2])
        assert model.training
    finally:
        model.eval()
    data = scored.to_dict()
    assert data["nll"] == list(scored.nll) and data["tokens"] == list(scored.tokens)
    assert data["mean"] == pytest.approx(sum(s / n for s, n in zip(scored.nll, scored.tokens)) / 2)
    assert set(data["tasks"]) == {"boolq", "piqa"}


def test_bad_input(model, tokenizer):
    with pytest.raises(GastuneError, match="no records"):
        gold_response_nll(model, tokenizer, [])
    with pytest.raises(GastuneError, match="batch_size"):
        gold_response_nll(model, tokenizer, RECORDS, batch_size=0)

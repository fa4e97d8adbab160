"""The gold-response NLL scored inside the option ranking's pass equals the separate pass's."""

from __future__ import annotations

import pytest

from gastune.data.commonsense import load_commonsense
from gastune.data.prompts import answer_text
from gastune.eval import loglik
from gastune.eval.loglik import evaluate_commonsense, evaluate_commonsense_and_nll
from gastune.eval.nll import gold_response_nll
from gastune.models.loading import load_tokenizer
from tests.conftest import tiny_llama_for


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama_for(tokenizer, hidden_size=64, initializer_range=0.2).eval()


@pytest.mark.parametrize(("fmt", "rule"), [("mc", "sum"), ("rc", "mean")])
def test_folded_nll_and_ranking_equal_the_separate_passes(model, tokenizer, fmt, rule):
    records = load_commonsense("validation", per_task=2, seed=0, prompt_format=fmt)  # all 8 tasks
    assert len({r["task"] for r in records}) == 8
    result, nll = evaluate_commonsense_and_nll(
        model, tokenizer, records, batch_size=5, rule=rule, prompt_format=fmt
    )
    alone = gold_response_nll(model, tokenizer, records, batch_size=5)
    assert nll.folded == len(records)  # every gold sequence shared its prompt's cached prefix
    assert nll.tokens == alone.tokens and nll.tasks == alone.tasks
    assert list(nll.nll) == pytest.approx(list(alone.nll), rel=1e-5)
    assert nll.mean == pytest.approx(alone.mean, rel=1e-5)
    ranked = evaluate_commonsense(model, tokenizer, records, batch_size=5, rule=rule, prompt_format=fmt)
    assert [p.predicted for p in result.predictions] == [p.predicted for p in ranked.predictions]
    for got, want in zip(result.predictions, ranked.predictions):
        assert got.sum_logprobs == pytest.approx(want.sum_logprobs, rel=1e-6, abs=1e-6)
        assert got.mean_logprobs == pytest.approx(want.mean_logprobs, rel=1e-6, abs=1e-6)
    assert result.average == ranked.average and not model.training


def test_gold_that_does_not_share_the_prefix_falls_back(model, tokenizer, monkeypatch):
    records = load_commonsense("validation", tasks=["boolq", "arc_easy"], per_task=2, seed=0)
    # A gold output unlike every candidate ("the correct answer is ..."): its tokens leave the
    # candidates' shared prefix, so it is scored by the separate pass.
    records[1] = {**records[1], "output": "no idea"}
    calls = []
    real = loglik._with_extra
    monkeypatch.setattr(loglik, "_with_extra", lambda e, i, s: calls.append(s) or real(e, i, s))
    result, nll = evaluate_commonsense_and_nll(model, tokenizer, records, batch_size=3)
    assert len(calls) == 4 and nll.folded == 3
    alone = gold_response_nll(model, tokenizer, records, batch_size=3)
    assert list(nll.nll) == pytest.approx(list(alone.nll), rel=1e-5)
    assert records[0]["output"] == answer_text(records[0]["answer"])
    assert result.average == evaluate_commonsense(model, tokenizer, records, batch_size=3).average

"""The batched log-likelihood scorer against a slow one-sequence-at-a-time reference."""

from __future__ import annotations

import copy

import pytest
import torch

from gastune.data.prompts import TASK_LABELS, answer_text, format_prompt
from gastune.errors import GastuneError
from gastune.eval import loglik
from gastune.eval.loglik import evaluate_commonsense, score_candidates
from gastune.models.loading import load_tokenizer
from tests.conftest import tiny_llama_for


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def model(tokenizer):
    # A large init range makes predictions peaked: candidates score clearly apart, greedy
    # choices are far from ties.
    return tiny_llama_for(tokenizer, hidden_size=64, initializer_range=0.2).eval()


def reference_scores(model, tokenizer, prompt: str, candidates: list[str]) -> list[float]:
    """Obviously correct: one unpadded sequence per candidate, sum of log-softmax over its tokens."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    scores = []
    for cand in candidates:
        ids = tokenizer(prompt + cand)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        scores.append(sum(logp[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids))))
    return scores


def make_record(task: str, instruction: str, answer: str, input_text: str = "") -> dict:
    return {
        "instruction": instruction,
        "input": input_text,
        "output": answer_text(answer),
        "answer": answer,
        "task": task,
    }


RECORDS = [
    make_record("boolq", "Please answer the following question with true or false, question: is it?", "true"),
    make_record(
        "piqa",
        "Please choose the correct solution to the question: open a jar\n\nSolution1: twist the lid"
        "\n\nSolution2: hit it with a hammer repeatedly until it breaks\n\nAnswer format: solution1/solution2",
        "solution1",
    ),
    make_record("arc_easy", "Which is a planet?\n\nAnswer1: Mars\n\nAnswer2: the Sun", "answer1"),
    make_record("hellaswag", "A man walks. Pick the ending.", "ending3", input_text="some context here"),
    make_record("winogrande", "The trophy did not fit in the suitcase because _ was big.", "option2"),
]

# Free-form candidates: several tokens after the shared prefix, one candidate a prefix of
# another, different lengths; this exercises the KV-cache suffix path.
FREE_ITEMS = [
    ("The capital of France is", [" Paris", " the city of Paris, obviously", " Lyon", " Paris is"]),
    ("Q: 2+2?\nA:", [" 4", " four, since two and two make four"]),
    (format_prompt("Say something."), ["hello there", "goodbye", "hello"]),
]


def all_items():
    items = [
        (format_prompt(r["instruction"], r["input"]), [answer_text(x) for x in TASK_LABELS[r["task"]]])
        for r in RECORDS
    ]
    return items + FREE_ITEMS


def test_batched_scores_match_reference(model, tokenizer):
    items = all_items()
    scored = score_candidates(model, tokenizer, items, batch_size=4)
    for (prompt, cands), per_cand in zip(items, scored):
        expected = reference_scores(model, tokenizer, prompt, cands)
        assert len(per_cand) == len(cands)
        for cand, token_logps, ref in zip(cands, per_cand, expected):
            n_tokens = len(tokenizer(prompt + cand)["input_ids"]) - len(tokenizer(prompt)["input_ids"])
            assert len(token_logps) == n_tokens
            assert sum(token_logps) == pytest.approx(ref, abs=1e-4)


def test_batch_size_does_not_change_scores(model, tokenizer):
    items = all_items()
    one = score_candidates(model, tokenizer, items, batch_size=1)
    for batch_size in (3, 16):
        other = score_candidates(model, tokenizer, items, batch_size=batch_size)
        for a, b in zip(one, other):
            for x, y in zip(a, b):
                assert x == pytest.approx(y, abs=1e-4)


def test_shared_header_run_once_gives_same_scores(model, tokenizer, monkeypatch):
    items = all_items()[:3]  # Alpaca prompts without input: ~30 header tokens in common
    batch_sizes = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: batch_sizes.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        shared = score_candidates(model, tokenizer, items, batch_size=3)
    finally:
        hook.remove()
    assert batch_sizes == [1, 3]  # the header once, then the rest of each prompt
    monkeypatch.setattr(loglik, "_MIN_COMMON", 10**9)  # never share the header
    separate = score_candidates(model, tokenizer, items, batch_size=3)
    for a, b in zip(shared, separate):
        for x, y in zip(a, b):
            assert x == pytest.approx(y, abs=1e-4)


class _BosTokenizer:
    """The real tokenizer, plus a BOS token in front whenever special tokens are requested."""

    def __init__(self, inner, bos_id: int):
        self.inner, self.bos_id, self.pad_token_id = inner, bos_id, inner.pad_token_id

    def __call__(self, text, add_special_tokens: bool = True):
        out = self.inner(text, add_special_tokens=False)
        if add_special_tokens:
            ids = out["input_ids"]
            out["input_ids"] = (
                [self.bos_id, *ids] if isinstance(text, str) else [[self.bos_id, *x] for x in ids]
            )
        return out


def test_bos_token_is_kept_in_front_and_not_scored(model, tokenizer):
    bos = _BosTokenizer(tokenizer, bos_id=1)
    items = FREE_ITEMS[:2]
    scored = score_candidates(model, bos, items, batch_size=2)
    for (prompt, cands), per_cand in zip(items, scored):
        expected = reference_scores(model, bos, prompt, cands)
        assert [sum(x) for x in per_cand] == pytest.approx(expected, abs=1e-4)


def test_evaluate_predicts_argmax_of_reference(model, tokenizer):
    result = evaluate_commonsense(model, tokenizer, RECORDS, batch_size=2, progress=False)
    assert len(result.predictions) == len(RECORDS)
    for record, pred in zip(RECORDS, result.predictions):
        labels = TASK_LABELS[record["task"]]
        prompt = format_prompt(record["instruction"], record["input"])
        ref = reference_scores(model, tokenizer, prompt, [answer_text(x) for x in labels])
        assert pred.labels == labels
        assert pred.sum_logprobs == pytest.approx(ref, abs=1e-4)
        assert pred.predicted == labels[max(range(len(ref)), key=ref.__getitem__)]
        assert pred.correct == (pred.predicted == record["answer"])


def test_prediction_rules_and_ties(monkeypatch):
    # Fixed token log-probs: candidate 0 has the best sum, candidate 1 the best mean.
    fake = [[[-1.0, -1.0], [-0.5, -0.5, -0.5, -0.5, -0.5], [-3.0]], [[-1.0], [-1.0]]]
    monkeypatch.setattr(loglik, "score_candidates", lambda *a, **k: fake)
    records = [
        make_record("siqa", "q", "answer2"),
        make_record("boolq", "q", "true"),
    ]
    by_sum = evaluate_commonsense(None, None, records, progress=False)
    assert [p.predicted for p in by_sum.predictions] == ["answer1", "true"]  # tie -> first label
    assert by_sum.predictions[0].sum_logprobs == (-2.0, -2.5, -3.0)
    assert by_sum.predictions[0].mean_logprobs == (-1.0, -0.5, -3.0)
    assert by_sum.tasks["siqa"].correct == 0 and by_sum.tasks["boolq"].correct == 1
    by_mean = evaluate_commonsense(None, None, records, progress=False, rule="mean")
    assert by_mean.predictions[0].predicted == "answer2"
    assert by_mean.average == 1.0 and by_sum.average == 0.5


def test_model_mode_restored_and_peft_model_supported(model, tokenizer):
    from peft import LoraConfig, get_peft_model

    base = evaluate_commonsense(model, tokenizer, RECORDS[:3], progress=False)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    tuned = evaluate_commonsense(peft_model, tokenizer, RECORDS[:3], progress=False)
    assert peft_model.training  # restored
    # LoRA starts as the identity (B = 0), so the scores are the base model's.
    for a, b in zip(base.predictions, tuned.predictions):
        assert a.sum_logprobs == pytest.approx(b.sum_logprobs, abs=1e-4)


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([], "no records"),
        ([make_record("copa", "q", "answer1")], "unknown task"),
        ([make_record("boolq", "q", "maybe")], "not one of"),
        ([{"instruction": "q", "answer": "true"}], "no 'task'"),
    ],
)
def test_bad_records_raise(records, message):
    with pytest.raises(GastuneError, match=message):
        evaluate_commonsense(None, None, records, progress=False)


def test_bad_rule_and_batch_size_raise(model, tokenizer):
    with pytest.raises(GastuneError, match="rule"):
        evaluate_commonsense(model, tokenizer, RECORDS, rule="max")
    with pytest.raises(GastuneError, match="batch_size"):
        score_candidates(model, tokenizer, FREE_ITEMS, batch_size=0)


def test_only_the_labels_a_question_states_are_scored():
    """A 4-choice ARC question must not be scored against answer5."""
    from gastune.eval.loglik import _check_record

    four = {
        "task": "arc_easy",
        "answer": "answer2",
        "instruction": "Q\n\nAnswer format: answer1/answer2/answer3/answer4",
    }
    assert _check_record(0, four) == ("answer1", "answer2", "answer3", "answer4")
    five = {**four, "instruction": "Q\n\nAnswer format: answer1/answer2/answer3/answer4/answer5"}
    assert len(_check_record(0, five)) == 5
    bare = {**four, "instruction": "no format line"}
    assert len(_check_record(0, bare)) == 5
    with pytest.raises(GastuneError):
        _check_record(0, {**four, "answer": "answer5"})


RC_RECORDS = [
    {
        **make_record(
            "arc_easy", "Please choose the correct answer to the question: Which is a planet?", "answer2"
        ),
        "choices": ["the Sun", "Mars, the red one", "a comet"],
    },
    {
        **make_record("winogrande", "The trophy did not fit in the suitcase because _ was big.", "option1"),
        "choices": ["the trophy", "the suitcase"],
    },
    {
        **make_record(
            "boolq", "Please answer the following question with true or false, question: is it?", "false"
        ),
        "choices": ["true", "false"],
    },
]


@pytest.mark.parametrize("rule", ["sum", "mean"])
def test_rc_format_ranks_the_option_texts_like_the_reference(model, tokenizer, rule):
    result = evaluate_commonsense(
        model, tokenizer, RC_RECORDS, batch_size=2, progress=False, rule=rule, prompt_format="rc"
    )
    for record, pred in zip(RC_RECORDS, result.predictions):
        # Obviously correct: one sequence per option text, summed (or averaged) token log-probs.
        prompt = format_prompt(record["instruction"], record["input"])
        candidates = [answer_text(c) for c in record["choices"]]
        ref = reference_scores(model, tokenizer, prompt, candidates)
        prompt_len = len(tokenizer(prompt)["input_ids"])
        lengths = [len(tokenizer(prompt + c)["input_ids"]) - prompt_len for c in candidates]
        ranked = ref if rule == "sum" else [s / n for s, n in zip(ref, lengths)]
        assert pred.labels == TASK_LABELS[record["task"]][: len(record["choices"])]
        assert pred.sum_logprobs == pytest.approx(ref, abs=1e-4)
        assert pred.predicted == pred.labels[max(range(len(ranked)), key=ranked.__getitem__)]
    # The option texts differ in length, so the two rules are not the same ranking by construction.
    assert {len(c) for c in RC_RECORDS[0]["choices"]} != 1


@pytest.mark.parametrize(
    ("choices", "message"),
    [
        (None, "needs a 'choices' list"),
        (["", "x", "y"], "needs a 'choices' list"),
        (["a", "b", "c", "d", "e", "f"], "6 choices for the 5 labels"),
    ],
)
def test_rc_format_needs_the_option_texts(choices, message):
    record = {**RC_RECORDS[0], "choices": choices}
    if choices is None:
        del record["choices"]
    with pytest.raises(GastuneError, match=message):
        evaluate_commonsense(None, None, [record], progress=False, prompt_format="rc")
    with pytest.raises(GastuneError, match="unknown prompt format"):
        evaluate_commonsense(None, None, RC_RECORDS, progress=False, prompt_format="cloze")

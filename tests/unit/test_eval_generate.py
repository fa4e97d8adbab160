"""The generation protocol: label extraction, batched left-padded generation, accuracy."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from gastune.data.prompts import answer_text, format_prompt
from gastune.errors import GastuneError
from gastune.eval import generate
from gastune.eval.generate import evaluate_commonsense_generation, extract_label, generate_responses
from gastune.eval.result import EvalResult
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


def record(task: str, instruction: str, answer: str) -> dict:
    return {
        "instruction": instruction,
        "input": "",
        "output": answer_text(answer),
        "answer": answer,
        "task": task,
    }


# ---- extraction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "labels", "expected"),
    [
        ("the correct answer is true", ("true", "false"), "true"),
        ("false, definitely not true", ("true", "false"), "false"),  # first by position
        ("solution2 or solution1", ("solution1", "solution2"), "solution2"),
        ("answer3", ("answer1", "answer2", "answer3", "answer4", "answer5"), "answer3"),
        ("ending4 then ending1", ("ending1", "ending2", "ending3", "ending4"), "ending4"),
        ("option1", ("option1", "option2"), "option1"),
        ("The correct answer is True", ("true", "false"), None),  # case-sensitive, as the paper
        ("I cannot tell", ("true", "false"), None),
        ("", ("option1", "option2"), None),
        ("answer5 then answer2", ("answer1", "answer2", "answer3"), "answer2"),  # unstated label skipped
    ],
)
def test_extract_label(response, labels, expected):
    assert extract_label(response, labels) == expected


def test_longer_labels_win_over_their_prefixes():
    assert extract_label("x ab y", ("a", "ab")) == "ab"
    assert extract_label("x a+b", ("a+b", "b")) == "a+b"  # regex characters are escaped


def fake_responses(monkeypatch, replies: dict[str, str]) -> list[dict]:
    """Make generation return ``replies[instruction]`` for each prompt; record the calls."""
    calls = []

    def fake(model, tokenizer, prompts, max_new_tokens, num_beams, batch_size, progress=False):
        calls.append({"prompts": list(prompts), "max_new_tokens": max_new_tokens, "num_beams": num_beams})
        by_prompt = {format_prompt(k): v for k, v in replies.items()}
        return [by_prompt[p] for p in prompts]

    monkeypatch.setattr(generate, "generate_responses", fake)
    return calls


def test_accuracy_from_first_match(monkeypatch):
    records = [
        record("boolq", "q1\n\nAnswer format: true/false", "true"),
        record("boolq", "q2\n\nAnswer format: true/false", "false"),
        record("boolq", "q3\n\nAnswer format: true/false", "false"),
        record("arc_easy", "q4\n\nAnswer format: answer1/answer2/answer3", "answer2"),
        record("arc_easy", "q5\n\nAnswer format: answer1/answer2/answer3", "answer1"),
    ]
    calls = fake_responses(
        monkeypatch,
        {
            records[0]["instruction"]: "the correct answer is true",  # right
            records[1]["instruction"]: "true or false? the answer is false",  # first match: wrong
            records[2]["instruction"]: "no idea",  # no match: wrong
            records[3]["instruction"]: "answer5 is wrong, the answer is answer2",  # answer5 not stated
            records[4]["instruction"]: "the correct answer is answer1",
        },
    )
    result = evaluate_commonsense_generation(None, None, records, max_new_tokens=7, num_beams=4)
    assert calls[0]["max_new_tokens"] == 7 and calls[0]["num_beams"] == 4
    assert [p.predicted for p in result.predictions] == ["true", "true", None, "answer2", "answer1"]
    assert [p.correct for p in result.predictions] == [True, False, False, True, True]
    assert result.tasks["boolq"].correct == 1 and result.tasks["boolq"].n == 3
    assert result.tasks["arc_easy"].accuracy == 1.0
    assert result.average == pytest.approx((1 / 3 + 1) / 2)
    assert result.rule == "beam4"
    assert result.predictions[2].response == "no idea"
    # The results JSON round-trips, generated text included.
    again = EvalResult.from_dict(result.to_dict())
    assert again.predictions == result.predictions and again.average == result.average


def test_bad_records_are_rejected(monkeypatch):
    fake_responses(monkeypatch, {})
    with pytest.raises(GastuneError, match="no records"):
        evaluate_commonsense_generation(None, None, [])
    with pytest.raises(GastuneError, match="not one of"):
        evaluate_commonsense_generation(None, None, [record("boolq", "q", "maybe")])


# ---- generation --------------------------------------------------------------------------------

PROMPTS = [
    format_prompt("Is the sky blue?\n\nAnswer format: true/false"),
    format_prompt("Pick one."),
    format_prompt("A much longer instruction, so that the batch needs a good deal of left padding here."),
    format_prompt("Short"),
    format_prompt("Another question of middling length?"),
]


def one_at_a_time(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Obviously correct greedy decoding: no padding, no cache, argmax of the full forward."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return new


def test_batched_left_padded_greedy_equals_one_at_a_time(model, tokenizer):
    batched = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    for prompt, response in zip(PROMPTS, batched):
        assert response == tokenizer.decode(
            one_at_a_time(model, tokenizer, prompt, 6), skip_special_tokens=True
        )
    # Same tokens whatever the batch composition, and the model is back in its mode.
    model.train()
    assert (
        generate_responses(model, tokenizer, PROMPTS[::-1], max_new_tokens=6, batch_size=5) == batched[::-1]
    )
    assert model.training
    model.eval()


def test_beam_search_runs_batched(model, tokenizer):
    beams = generate_responses(model, tokenizer, PROMPTS[:3], max_new_tokens=4, num_beams=3, batch_size=2)
    singles = [
        generate_responses(model, tokenizer, [p], max_new_tokens=4, num_beams=3)[0] for p in PROMPTS[:3]
    ]
    assert beams == singles


class ScriptedModel(torch.nn.Module):
    """A stand-in whose ``generate`` appends fixed tokens to every row (then pads after EOS)."""

    def __init__(self, new_tokens: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.new_tokens = new_tokens
        self.seen = []

    def generate(self, input_ids, attention_mask, **settings):
        self.seen.append((input_ids.clone(), attention_mask.clone(), settings))
        tail = torch.tensor(self.new_tokens).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


def test_responses_are_cut_at_eos_and_stop_string(tokenizer):
    hello = tokenizer("the correct answer is true", add_special_tokens=False)["input_ids"]
    section = tokenizer("\n\n### Instruction:", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    scripted = ScriptedModel([*hello, eos, *hello])
    assert (
        generate_responses(scripted, tokenizer, PROMPTS[:2], max_new_tokens=3)
        == ["the correct answer is true"] * 2
    )
    ids, mask, settings = scripted.seen[0]
    # Left padding: the shorter prompt's padding is on the left, the mask says so.
    assert mask[:, -1].all() and not mask.all() and (mask[:, 0] == 0).any()
    assert (ids[mask == 0] == tokenizer.pad_token_id).all()
    assert settings["do_sample"] is False and settings["max_new_tokens"] == 3
    scripted = ScriptedModel([*hello, *section, *hello])
    assert generate_responses(scripted, tokenizer, PROMPTS[:1], stop="###") == [
        "the correct answer is true\n\n"
    ]


def test_invalid_settings(model, tokenizer):
    with pytest.raises(GastuneError, match=">= 1"):
        generate_responses(model, tokenizer, PROMPTS, num_beams=0)


# ---- gastune eval --protocol generate ---------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_generate_protocol_writes_provenance(model_dir, tmp_path, monkeypatch, capsys):
    import json

    from gastune.cli.main import main
    from gastune.data import commonsense

    records = [record("boolq", f"q{i}\n\nAnswer format: true/false", "true") for i in range(3)]
    monkeypatch.setattr(commonsense, "load_commonsense", lambda **kw: records)
    adapter = tmp_path / "adapter"
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(model_dir), LoraConfig(r=2, target_modules=["q_proj"])
    )
    peft_model.save_pretrained(adapter)
    (adapter / "gastune_config.json").write_text(json.dumps({"method": "gast"}))
    out = tmp_path / "gen.json"
    argv = ["eval", "--model", str(model_dir), "--adapter", str(adapter), "--protocol", "generate"]
    assert main([*argv, "--num-beams", "2", "--max-new-tokens", "3", "--out", str(out)]) == 0
    assert "| boolq" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["method"] == "gast" and data["adapter"] == str(adapter) and data["model"] == str(model_dir)
    assert data["git"]["commit"] and data["date"] and data["machine"]["device"] == "cpu"
    assert data["settings"]["protocol"] == "generate" and data["settings"]["num_beams"] == 2
    assert data["settings"]["max_new_tokens"] == 3 and data["results"]["rule"] == "beam2"
    assert all(isinstance(p["response"], str) for p in data["results"]["predictions"])


def test_cli_rejects_bad_generation_flags(model_dir):
    from gastune.cli.main import main

    assert main(["eval", "--model", str(model_dir), "--num-beams", "0"]) == 2
    assert main(["eval", "--model", str(model_dir), "--gsm8k", "--protocol", "generate"]) == 2

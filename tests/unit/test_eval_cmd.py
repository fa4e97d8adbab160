"""``gastune eval`` end to end on a tiny saved model, with hand-made records."""

from __future__ import annotations

import json
import sys
import types

import pytest
from transformers import LlamaForCausalLM

from gastune.cli.main import main
from gastune.data.prompts import answer_text
from gastune.models.loading import load_tokenizer
from tests.conftest import tiny_llama_for


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = load_tokenizer("smollm2-135m")
    model = tiny_llama_for(tokenizer, hidden_size=64, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def calls(monkeypatch):
    """Replace the data loader by one returning hand-made records; record its arguments."""
    seen = []

    def load_commonsense(split="train", tasks=None, per_task=None, seed=0, prompt_format="mc"):
        seen.append({"split": split, "tasks": tasks, "per_task": per_task, "seed": seed})
        assert prompt_format == "mc"
        answers = {"boolq": ["true", "false"], "arc_easy": ["answer1", "answer3", "answer2"]}
        return [
            {
                "instruction": f"{task} question {i}",
                "input": "",
                "output": answer_text(a),
                "answer": a,
                "task": task,
            }
            for task in tasks
            for i, a in enumerate(answers[task][:per_task])
        ]

    import gastune.data.commonsense as real

    module = types.ModuleType("gastune.data.commonsense")
    module.__dict__.update({k: v for k, v in vars(real).items() if not k.startswith("__")})
    module.load_commonsense = load_commonsense
    monkeypatch.setitem(sys.modules, "gastune.data.commonsense", module)
    return seen


def test_eval_prints_table_and_writes_json(model_dir, calls, tmp_path, capsys):
    out = tmp_path / "base.json"
    argv = ["eval", "--model", str(model_dir), "--tasks", "boolq", "arc_easy", "--per-task", "2"]
    assert main([*argv, "--seed", "3", "--batch-size", "3", "--out", str(out)]) == 0
    assert calls == [{"split": "validation", "tasks": ["boolq", "arc_easy"], "per_task": 2, "seed": 3}]
    printed = capsys.readouterr().out
    assert "| boolq" in printed and "| arc_easy" in printed and "| average" in printed
    data = json.loads(out.read_text())
    assert data["model"] == str(model_dir) and data["adapter"] is None
    assert data["settings"]["batch_size"] == 3
    assert data["results"]["tasks"]["arc_easy"]["n"] == 2
    # The held-out NLL of each gold response, in the records' order (4 questions).
    assert len(data["nll"]["nll"]) == 4 and all(v > 0 for v in data["nll"]["nll"])
    per_token = [s / n for s, n in zip(data["nll"]["nll"], data["nll"]["tokens"])]
    assert data["nll"]["mean"] == pytest.approx(sum(per_token) / 4)
    assert f"{data['nll']['mean']:.4f} nats per token" in printed


def test_eval_without_nll(model_dir, calls, tmp_path, capsys):
    out = tmp_path / "no_nll.json"
    argv = ["eval", "--model", str(model_dir), "--tasks", "boolq", "--per-task", "2", "--no-nll"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "nll" not in json.loads(out.read_text()) and "nats per token" not in capsys.readouterr().out


def test_eval_with_adapter_and_comparison(model_dir, calls, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    base = LlamaForCausalLM.from_pretrained(model_dir)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    before = tmp_path / "base.json"
    assert main(["eval", "--model", str(model_dir), "--tasks", "boolq", "--out", str(before)]) == 0
    argv = ["eval", "--model", str(model_dir), "--adapter", str(adapter), "--tasks", "boolq"]
    assert main([*argv, "--compare", str(before)]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "change" in line)
    assert "base" in header and "this run" in header
    assert "+0.000" in printed  # a fresh LoRA (B = 0) changes nothing


def test_missing_adapter_is_a_user_error(model_dir, calls, tmp_path, capsys):
    argv = ["eval", "--model", str(model_dir), "--adapter", str(tmp_path / "nope"), "--tasks", "boolq"]
    assert main(argv) == 2
    assert "not a peft adapter folder" in capsys.readouterr().err

"""lm-evaluation-harness on gastune's task YAMLs, offline, against gastune's own scorer.

An independent check of ``gastune.eval.loglik``: lm-eval tokenises, batches and scores the
same prompts and candidate responses its own way. Its ``acc`` must equal gastune's
``rule="sum"`` accuracy on the same questions, and each candidate's log-likelihood must
differ from gastune's summed log-probability by one constant per question (lm-eval moves the
prompt's trailing newline into the continuation, adding ``log p("\\n" | prompt)``).

lm_eval is an optional extra (``gastune[lm-eval]``) that ``make test`` installs, so CI runs
this; it is imported here without a skip on purpose.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from gastune.cli.main import main
from gastune.data.commonsense import load_commonsense
from gastune.eval import evaluate_commonsense
from gastune.eval.harness import run_harness, task_name, write_harness_tasks
from tests.unit._model_folder import save_tiny_llama

TASKS = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from gastune.models import load_tokenizer
    from tests.conftest import tiny_llama_for

    tokenizer = load_tokenizer("smollm2-135m")
    # A large initialiser makes the output distribution peaked: candidates' scores differ by
    # far more than float noise, so the rankings compared below are not coin flips.
    model = tiny_llama_for(tokenizer, hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    return model.eval(), tokenizer


@pytest.mark.parametrize("fmt", ["mc", "rc"])
def test_harness_accuracy_equals_gastunes_scorer(tiny, tmp_path, fmt):
    model, tokenizer = tiny
    torch.set_num_threads(1)
    names = write_harness_tasks(tmp_path, tasks=TASKS, per_task=3, seed=1, prompt_format=fmt)
    assert names == [task_name(t, fmt) for t in TASKS]
    # The YAMLs read local files only.
    for name in names:
        config = json.loads((tmp_path / f"{name}.yaml").read_text())
        assert config["dataset_path"] == "json"
        assert config["dataset_kwargs"]["data_files"]["validation"] == str(
            (tmp_path / f"{name}.jsonl").resolve()
        )
    output = run_harness(model, tokenizer, tmp_path, names, batch_size=7)

    records = load_commonsense("validation", tasks=TASKS, per_task=3, seed=1, prompt_format=fmt)
    ours = evaluate_commonsense(model, tokenizer, records, rule="sum", prompt_format=fmt, progress=False)
    by_task = {t: [p for p in ours.predictions if p.task == t] for t in TASKS}
    decisive = 0
    for task, name in zip(TASKS, names):
        assert output["results"][name]["acc,none"] == pytest.approx(ours.tasks[task].accuracy)
        samples = sorted(output["samples"][name], key=lambda s: s["doc_id"])
        assert len(samples) == len(by_task[task]) == 3
        for sample, prediction in zip(samples, by_task[task]):
            harness = [float(r[0][0]) for r in sample["resps"]]
            offsets = [h - g for h, g in zip(harness, prediction.sum_logprobs)]
            assert max(offsets) - min(offsets) < 2e-3, (task, harness, prediction.sum_logprobs)
            gaps = sorted(prediction.sum_logprobs, reverse=True)
            if gaps[0] - gaps[1] > 1e-2:
                decisive += 1
                assert prediction.labels[harness.index(max(harness))] == prediction.predicted
    assert decisive >= 16  # most questions are decided by a clear margin, so the check bites


def test_cli_runs_the_harness_on_an_adapter_offline(tmp_path, monkeypatch, capsys):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from gastune.models import load_tokenizer

    model_dir = save_tiny_llama(tmp_path / "model")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "gastune_config.json").write_text(json.dumps({"eval": {"format": "rc"}}))
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "harness.json"
    argv = ["lm-eval", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter")]
    assert main([*argv, "--tasks", "piqa", "arc_easy", "--per-task", "4", "--out", str(out)]) == 0
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
    doc = json.loads(out.read_text())
    assert doc["format"] == "rc"  # read from the adapter's record
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter")
    records = load_commonsense("validation", tasks=["piqa", "arc_easy"], per_task=4, prompt_format="rc")
    ours = evaluate_commonsense(
        tuned.eval(), load_tokenizer(str(model_dir)), records, rule="sum", prompt_format="rc", progress=False
    )
    for task in ("piqa", "arc_easy"):
        assert doc["tasks"][task_name(task, "rc")]["acc"] == pytest.approx(ours.tasks[task].accuracy)
        assert doc["tasks"][task_name(task, "rc")]["n"] == 4
    assert "gastune_arc_easy_rc" in capsys.readouterr().out


def test_write_tasks_only_prints_the_lm_eval_command(tmp_path, capsys):
    assert main(["lm-eval", "--write-tasks", str(tmp_path / "t"), "--tasks", "boolq", "--per-task", "2"]) == 0
    printed = capsys.readouterr().out
    assert "--include_path" in printed and "gastune_commonsense_mc" in printed
    lines = (tmp_path / "t" / "gastune_boolq_mc.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["choices"] == [
        "the correct answer is true",
        "the correct answer is false",
    ]

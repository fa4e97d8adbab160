"""``gastune demo`` end to end on a tiny local model: training changes the adapter, the table
and the results JSON agree with an independent evaluation of the saved adapters."""

from __future__ import annotations

import json

import pytest

from gastune.cli.main import main
from tests.unit._model_folder import save_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("fmt", ["rc", "mc"])
def test_demo_trains_evaluates_and_writes_results(model_dir, tmp_path, capsys, fmt):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gastune.data import load_commonsense
    from gastune.eval import evaluate_commonsense
    from gastune.models import load_tokenizer

    out = tmp_path / "demo"
    argv = ["demo", "--model", str(model_dir), "--methods", "lora,gast", "--train-per-task", "2"]
    argv += ["--eval-per-task", "2", "--max-steps", "2", "--batch-size", "4", "--gast-k", "2"]
    argv += ["--gast-support-size", "2", "--format", fmt, "--output-dir", str(out), "--learning-rate", "0.05"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["results"]) == ["before", "lora", "gast"]
    rule = "mean" if fmt == "rc" else "sum"
    assert f"({fmt} format, {rule} rule)" in printed
    for name in ("before", "lora", "gast"):
        assert f"{doc['results'][name]['average']:.3f}" in printed
        assert set(doc["results"][name]["tasks"]) == {
            "boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"
        }  # fmt: skip
    # Independent check: the saved LoRA adapter, scored again, gives the table's numbers,
    # and it is not the base model (training changed the scores).
    tokenizer = load_tokenizer(str(model_dir))
    records = load_commonsense("validation", per_task=2, seed=0, prompt_format=fmt)
    base = evaluate_commonsense(
        AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, records, rule=rule, prompt_format=fmt,
        progress=False,
    )  # fmt: skip
    tuned_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "lora")
    tuned = evaluate_commonsense(
        tuned_model, tokenizer, records, rule=rule, prompt_format=fmt, progress=False
    )
    assert tuned.average == pytest.approx(doc["results"]["lora"]["average"])
    assert base.average == pytest.approx(doc["results"]["before"]["average"])
    base_scores = [s for p in base.predictions for s in p.sum_logprobs]
    tuned_scores = [s for p in tuned.predictions for s in p.sum_logprobs]
    assert max(abs(a - b) for a, b in zip(base_scores, tuned_scores)) > 1e-2

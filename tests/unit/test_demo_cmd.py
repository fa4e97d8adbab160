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
    # Costs: both methods timed, GAST's ratio to LoRA printed from the same numbers.
    lora, gast = doc["training"]["lora"], doc["training"]["gast"]
    assert lora["train_runtime"] > 0 and gast["train_runtime"] > 0
    assert f"{gast['train_runtime'] / lora['train_runtime']:.2f}× lora's time" in printed
    assert doc["threads"]["threads"] >= 1
    # GAST's selection heat map: a PNG (LoRA selects nothing, so it has none).
    assert (out / "gast_selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "lora_selection.png").exists()


def test_publish_writes_the_json_and_the_readme_block_from_it(model_dir, tmp_path, monkeypatch, capsys):
    from gastune.cli.demo_report import BEGIN, END

    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "README.md").write_text(f"# intro\n\n{BEGIN}\nold numbers 0.999\n{END}\n\n## after\n")
    argv = ["demo", "--model", str(model_dir), "--methods", "lora,gast", "--train-per-task", "1"]
    argv += ["--eval-per-task", "1", "--max-steps", "1", "--batch-size", "4", "--gast-k", "2"]
    argv += ["--output-dir", str(tmp_path / "demo"), "--threads", "1", "--publish"]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "docs/results/demo_cpu.json").read_text())
    assert doc["threads"] == {"threads": 1, "chosen_by": "--threads"}
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("# intro\n") and readme.endswith("\n## after\n")
    assert "old numbers" not in readme
    block = readme[readme.index(BEGIN) : readme.index(END)]
    for name in ("before", "lora", "gast"):
        assert f"{doc['results'][name]['average']:.3f}" in block
    assert "docs/results/demo_gast_selection.png" in block
    assert (tmp_path / "docs/results/demo_gast_selection.png").is_file()


def test_publish_refuses_a_readme_without_the_section_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("# no markers here\n")
    assert main(["demo", "--model", "does-not-matter", "--output-dir", str(tmp_path / "d"), "--publish"]) == 2
    assert "demo-results" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "docs").exists()


def test_thread_count_choice(monkeypatch):
    from gastune.cli import threads as threads_module
    from gastune.cli.threads import choose_threads, fastest_threads, idle_cores
    from gastune.errors import GastuneError

    assert [idle_cores(cores=2, load=x) for x in (0.0, 0.4, 0.6, 1.4, 30.0)] == [2, 2, 1, 1, 1]
    assert idle_cores(cores=16, load=3.2) == 13
    monkeypatch.delenv("GASTUNE_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    # The probe picks the fastest median; a loaded machine's slow multi-thread rounds lose.
    timings = {1: iter([0.20, 0.21, 0.19]), 2: iter([0.50, 0.10, 0.69]), 4: iter([0.3, 0.3, 0.3])}
    assert fastest_threads([1, 2, 4], timer=lambda n: next(timings[n])) == 1
    assert fastest_threads([2, 1], timer=lambda n: 0.1) == 1  # ties: fewer threads
    assert fastest_threads([2]) == 2  # nothing to compare: no probe
    seen = []
    monkeypatch.setattr(threads_module, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads_module.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    monkeypatch.setattr(
        threads_module, "fastest_threads", lambda candidates: seen.append(sorted(set(candidates))) or 3
    )
    assert choose_threads() == (3, "default: fastest in a probe of 1..4")
    assert seen == [[1, 3, 4]]  # 1 thread, the idle cores (4 - 1.2), all cores
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads() == (3, "OMP_NUM_THREADS")
    monkeypatch.setenv("GASTUNE_THREADS", "2")
    assert choose_threads() == (2, "GASTUNE_THREADS")
    assert choose_threads(5) == (5, "--threads")
    monkeypatch.setenv("GASTUNE_THREADS", "many")
    with pytest.raises(GastuneError, match="GASTUNE_THREADS"):
        choose_threads()

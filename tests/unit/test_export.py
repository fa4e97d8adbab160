"""Adapters a user can deploy: portable records, ordinary file modes, ``gastune export`` (a
clean peft folder, or merged into a model plain transformers loads), and ``gastune eval``
reading the prompt format and rule recorded with the adapter."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from gastune.cli.main import main
from tests.unit._model_folder import save_tiny_llama


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base model folder and a LoRA adapter trained on it for 2 steps (rc format)."""
    from gastune.training import DataConfig, GastuneConfig, ModelConfig
    from gastune.training.run import train

    root = tmp_path_factory.mktemp("export")
    model_dir = save_tiny_llama(root / "model")
    old = os.umask(0o022)
    try:
        train(
            ModelConfig(model=str(model_dir), lora_r=4, lora_alpha=8),
            DataConfig(per_task=1, prompt_format="rc", cutoff_len=96),
            GastuneConfig(
                output_dir=str(root / "run"), method="lora", max_steps=2, per_device_train_batch_size=4,
                learning_rate=0.05, use_cpu=True, save_strategy="no", report_to=[], logging_steps=1,
            ),
        )  # fmt: skip
    finally:
        os.umask(old)
    return model_dir, root / "run"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_records_portable_base_and_has_ordinary_modes(trained):
    model_dir, run = trained
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir)  # the name given, as given
    settings = json.loads((run / "gastune_config.json").read_text())
    digest = hashlib.sha256(b"model.safetensors\0" + (model_dir / "model.safetensors").read_bytes())
    assert settings["base_model"]["weights_sha256"] == digest.hexdigest()
    assert settings["eval"] == {"format": "rc", "rule": "mean"}
    # safetensors writes 0600 through a temporary file; the adapter must be readable by others.
    assert (run / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (run / "gastune_config.json").stat().st_mode & 0o777 == 0o644


def test_default_model_gets_the_hub_name_and_its_provenance():
    from gastune.models.portable import DEFAULT_HUB_ID, portable_name

    assert portable_name("smollm2-135m") == DEFAULT_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_name("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


def test_merged_export_loads_in_plain_transformers_with_the_adapters_logits(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, run = trained
    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(run), "--out", str(out), "--merge"]) == 0
    assert not (out / "adapter_config.json").exists()
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["Please choose the correct answer to the question: why?"], return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base_logits = _logits(base, ids)
    adapted = PeftModel.from_pretrained(base, run).eval()
    reference = _logits(adapted, ids)
    assert torch.allclose(_logits(merged, ids), reference, atol=1e-5, rtol=1e-4)
    assert (reference - base_logits).abs().max() > 1e-3  # the adapter is not a no-op


def test_peft_export_is_clean_and_equivalent(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, run = trained
    out = tmp_path / "peft"
    assert main(["export", "--adapter", str(run), "--out", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "gastune_config.json"} <= files
    assert "training_args.bin" not in files  # a pickle: not part of a clean folder
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~_umask() for p in out.iterdir())
    ids = torch.tensor([[5, 17, 99, 3]])
    a = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), run).eval(), ids)
    b = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval(), ids)
    assert torch.equal(a, b)


def test_export_refuses_bad_folders(trained, tmp_path, capsys):
    _, run = trained
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    assert main(["export", "--adapter", str(run), "--out", str(busy)]) == 2
    assert (busy / "x").read_text() == "keep me"
    assert main(["export", "--adapter", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not an empty folder" in err and "not a peft adapter folder" in err
    assert not (tmp_path / "o").exists()


def test_eval_uses_the_adapters_recorded_format_unless_told(trained, tmp_path, capsys):
    model_dir, run = trained
    common = ["eval", "--model", str(model_dir), "--adapter", str(run), "--tasks", "piqa", "--per-task", "2"]
    assert main([*common, "--out", str(tmp_path / "a.json")]) == 0
    assert "recorded with the adapter" in capsys.readouterr().out
    settings = json.loads((tmp_path / "a.json").read_text())["settings"]
    assert (settings["format"], settings["rule"]) == ("rc", "mean")
    assert main([*common, "--format", "mc", "--out", str(tmp_path / "b.json")]) == 0
    settings = json.loads((tmp_path / "b.json").read_text())["settings"]
    assert (settings["format"], settings["rule"]) == ("mc", "sum")
    assert main([*common, "--rule", "sum", "--out", str(tmp_path / "c.json")]) == 0
    settings = json.loads((tmp_path / "c.json").read_text())["settings"]
    assert (settings["format"], settings["rule"]) == ("rc", "sum")


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old

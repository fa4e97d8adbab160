# ruff: noqa: F811  (the fixtures model_dir and calls come from test_eval_cmd)
"""Issue 11, points 3 and 5: ``gastune eval`` refuses what it cannot score honestly, and
checks ``--out`` before the model loads. Each case: exit 2, one error line without a
traceback, no results file."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from tests.unit.test_bad_input import assert_one_error_line, cli
from tests.unit.test_eval_cmd import calls, model_dir  # noqa: F401  (fixtures)


def save_adapter(model_dir, folder, poison: float | None = None):
    base = LlamaForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    if poison is not None:
        with torch.no_grad():
            next(p for n, p in peft_model.named_parameters() if "lora_B" in n)[0, 0] = poison
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the base model is loaded: every check must come before it."""
    import gastune.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(loading, "load_tokenizer", refuse)


def eval_argv(model_dir, *extra):
    return ["eval", "--model", str(model_dir), "--tasks", "boolq", "--per-task", "2", *extra]


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_adapter_with_non_finite_weights_is_refused(
    model_dir, calls, tmp_path, capsys, no_model_load, poison
):
    adapter = save_adapter(model_dir, tmp_path / "adapter", poison=poison)
    out = tmp_path / "eval.json"
    code, err = cli(eval_argv(model_dir, "--adapter", str(adapter), "--out", str(out)), capsys)
    assert code == 2
    assert_one_error_line(err, "adapter_model.safetensors hold 1 non-finite values", "diverged")
    assert not out.exists()


@pytest.mark.parametrize("protocol", ["loglik", "generate"])
def test_base_model_with_non_finite_weights_is_refused(model_dir, calls, tmp_path, capsys, protocol):
    """A broken base model (no adapter to blame): NaN logits must not become an accuracy."""
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    model = LlamaForCausalLM.from_pretrained(broken)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    out = tmp_path / "eval.json"
    code, err = cli(eval_argv(broken, "--out", str(out), "--protocol", protocol), capsys)
    assert code == 2
    assert_one_error_line(err, "has non-finite weights in 1 tensor(s)", "layers.0.mlp.down_proj.weight")
    assert not out.exists()


def test_non_finite_log_probabilities_are_refused_not_scored(model_dir):
    """Finite weights can still give NaN scores (an overflow, a broken kernel): refused too."""
    from gastune.errors import GastuneError
    from gastune.eval import evaluate_commonsense
    from gastune.models.loading import load_tokenizer

    model = LlamaForCausalLM.from_pretrained(model_dir)
    model.lm_head.register_forward_hook(lambda module, args, out: out * float("nan"))
    records = [
        {"instruction": f"boolq question {i}", "input": "", "answer": "true", "task": "boolq"}
        for i in range(3)
    ]
    with pytest.raises(GastuneError, match="non-finite log-probabilities for 3 of 3 questions"):
        evaluate_commonsense(model, load_tokenizer(str(model_dir)), records, progress=False)


def test_adapter_folder_without_weights_never_reaches_a_hub(
    model_dir, tmp_path, capsys, no_model_load, monkeypatch
):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a local adapter folder reached the model hub")

    for name in ("hf_hub_download", "snapshot_download", "file_exists"):
        monkeypatch.setattr(huggingface_hub, name, no_hub)
    adapter = save_adapter(model_dir, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    code, err = cli(eval_argv(model_dir, "--adapter", str(adapter)), capsys)
    assert code == 2
    assert_one_error_line(err, "has no adapter weights", "never looked up on a model hub")


def test_truncated_adapter_weights_are_named(model_dir, tmp_path, capsys, no_model_load):
    adapter = save_adapter(model_dir, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    code, err = cli(eval_argv(model_dir, "--adapter", str(adapter)), capsys)
    assert code == 2
    assert_one_error_line(err, f"cannot read the adapter weights {weights}")


def test_base_model_mismatch_is_refused_unless_overridden(model_dir, calls, tmp_path, capsys, monkeypatch):
    adapter = save_adapter(model_dir, tmp_path / "adapter")
    other = tmp_path / "other-base"
    shutil.copytree(model_dir, other)  # same shapes, another model as far as anyone knows
    out = tmp_path / "eval.json"
    import gastune.models.loading as loading

    real_load = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    code, err = cli(eval_argv(other, "--adapter", str(adapter), "--out", str(out)), capsys)
    assert code == 2
    assert_one_error_line(
        err, f"was trained on '{model_dir}'", f"--model is '{other}'", "--allow-base-mismatch"
    )
    assert not out.exists()
    monkeypatch.setattr(loading, "load_model", real_load)
    argv = eval_argv(other, "--adapter", str(adapter), "--out", str(out), "--allow-base-mismatch")
    assert cli(argv, capsys)[0] == 0
    assert json.loads(out.read_text())["adapter"] == str(adapter)
    # the recorded base itself, named by another spelling of the same folder, is accepted
    assert cli(eval_argv(f"{model_dir}/.", "--adapter", str(adapter)), capsys)[0] == 0


def test_gastune_recorded_model_name_is_accepted(model_dir, tmp_path):
    from gastune.errors import GastuneError
    from gastune.eval.adapter_checks import check_base_model

    adapter = save_adapter(model_dir, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/elsewhere/SmolLM2-135M-Instruct"  # trained on another machine
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "gastune_config.json").write_text(json.dumps({"model": {"model": "smollm2-135m"}}))
    check_base_model(adapter, "smollm2-135m")  # what gastune recorded
    with pytest.raises(GastuneError, match="was trained on 'smollm2-135m'"):
        check_base_model(adapter, str(model_dir))


# ------------------------------------------------------------ --out is checked first (point 3)
def test_unwritable_out_fails_before_the_model_loads(model_dir, tmp_path, capsys, no_model_load):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = cli(eval_argv(model_dir, "--out", str(blocker / "eval.json")), capsys)
    assert code == 2
    assert_one_error_line(err, "--out", f"{blocker} is a file, not a folder")


def test_out_that_is_a_folder_fails_before_the_model_loads(model_dir, tmp_path, capsys, no_model_load):
    code, err = cli(eval_argv(model_dir, "--out", str(tmp_path)), capsys)
    assert code == 2
    assert_one_error_line(err, "is a folder")


def test_full_disk_fails_before_the_model_loads(model_dir, tmp_path, capsys, no_model_load, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "sub" / "eval.json"
    code, err = cli(eval_argv(model_dir, "--out", str(out)), capsys)
    assert code == 2
    assert_one_error_line(err, "--out", "MiB free on its disk", "needed for the results")
    assert not out.exists()

"""issue 11 ("nothing silently wrong") through the real CLI entry on a tiny model folder,
points 3 (fail before the work) and 1 (divergence is a failure): every failure exits non-zero
with one ``gastune train: error:`` line and no traceback, and leaves nothing that looks
complete (docs/reliability.md). Points 2 and 4 are in test_reliability_resume.py."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.unit._model_folder import save_tiny_llama
from tests.unit._reliability import ADAPTER, must_not_load, no_final_adapter, train_argv, write_sum_data
from tests.unit.test_bad_input import assert_one_error_line, cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_sum_data(tmp_path_factory.mktemp("data") / "d.jsonl")


# ------------------------------------------------------------ 3. fail before the work
@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be ≥ 1, got 0"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be ≥ 1, got 0"),
        (["--learning_rate", "-1e-3"], "learning_rate must be a finite number ≥ 0, got -0.001"),
        (["--learning_rate=-1e-3"], "learning_rate must be a finite number ≥ 0, got -0.001"),
        (["--learning_rate", "nan"], "learning_rate must be a finite number ≥ 0, got nan"),
        (["--learning_rate", "inf"], "learning_rate must be a finite number ≥ 0, got inf"),
        (["--lora_dropout", "1"], "lora_dropout must be in [0, 1), got 1.0"),
        (["--lora_dropout", "-0.1"], "lora_dropout must be in [0, 1), got -0.1"),
        (["--bf16", "true", "--fp16", "true"], "bf16 and fp16 cannot both be on"),
        (["--method", "gast", "--gast_k", "nan"], "gast_k must be a finite count or fraction, got nan"),
        (["--max_steps", "0"], "max_steps 0 trains no step"),
        (["--num_train_epochs", "0"], "num_train_epochs 0.0 trains no step"),
        (["--lora_alpha", "0"], "lora_alpha 0 makes the adapter's scaling 0"),
        (["--method", "gast", "--gast_temperature", "inf"], "gast_temperature must be finite, got inf"),
        (["--method", "lora", "--gast_k", "100"], "--gast_k has no effect with --method lora"),
        (["--method", "gast", "--ist_interval", "3"], "--ist_interval has no effect with --method gast"),
        (["--max_skipped_steps", "-1"], "max_skipped_steps must be ≥ 0"),
    ],
)
def test_invalid_values_fail_in_one_line_before_anything_loads(
    flags, fragment, tmp_path, capsys, monkeypatch
):
    import gastune.training.run as run

    monkeypatch.setattr(run, "load_model", must_not_load)
    out = tmp_path / "run"
    code, err = cli(["train", "--use_cpu", "true", "--output_dir", str(out), *flags], capsys)
    assert code == 2
    assert_one_error_line(err, fragment)
    assert not out.exists()


def test_a_method_flag_from_a_yaml_file_only_warns(model_dir, data, tmp_path, capsys, caplog):
    """A shared YAML (or a bench grid) may set GAST options for every method: a warning, not an error."""
    config = tmp_path / "c.yaml"
    config.write_text("method: lora\ngast_k: 8\n")
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        code, err = cli(
            [*train_argv(model_dir, data, out, "--max_steps", "1"), "--config", str(config)], capsys
        )
    assert code == 0, err
    assert "method lora ignores gast_k" in caplog.text


def test_an_output_dir_that_cannot_be_written_fails_before_the_model_loads(
    model_dir, data, tmp_path, capsys, monkeypatch
):
    import gastune.training.run as run

    monkeypatch.setattr(run, "load_model", must_not_load)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = cli(train_argv(model_dir, data, blocker / "run"), capsys)
    assert code == 2
    assert_one_error_line(err, "is a file, not a folder")
    # a folder that refuses new files (simulated: the tests run as root, which ignores chmod)
    import gastune.training.output_dir as output_dir

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(output_dir.tempfile, "mkstemp", refuse)
    code, err = cli(train_argv(model_dir, data, tmp_path / "ro" / "run"), capsys)
    assert code == 2
    assert_one_error_line(err, "ro/run is not writable (Permission denied)")


def test_too_little_free_space_fails_before_the_model_loads(model_dir, data, tmp_path, capsys, monkeypatch):
    import gastune.training.output_dir as output_dir
    import gastune.training.run as run

    monkeypatch.setattr(run, "load_model", must_not_load)
    real = shutil.disk_usage
    monkeypatch.setattr(output_dir.shutil, "disk_usage", lambda p: real(p)._replace(free=5 * 2**20))
    out = tmp_path / "run"
    code, err = cli(train_argv(model_dir, data, out), capsys)
    assert code == 2
    assert_one_error_line(err, "only 5 MiB free on its disk, at least 100 MiB needed")
    assert not out.exists()


def test_data_too_small_for_one_step_fails(model_dir, tmp_path, capsys):
    small = tmp_path / "two.jsonl"
    small.write_text("".join(json.dumps({"prompt": "a b", "completion": " c"}) + "\n" for _ in range(2)))
    out = tmp_path / "run"
    argv = train_argv(model_dir, small, out, "--dataloader_drop_last", "true", "--num_train_epochs", "1")
    code, err = cli(argv, capsys)
    assert code == 2
    assert_one_error_line(err, "2 training sequences make no full batch of 4", "no optimizer step would run")
    assert no_final_adapter(out)


# ------------------------------------------------------------ 1. divergence is a failure
@pytest.mark.parametrize(
    "method", [["--method", "lora"], ["--method", "gast", "--gast_k", "2"]], ids=["lora", "gast"]
)
def test_a_diverging_run_exits_3_and_leaves_only_the_last_good_checkpoint(
    method, model_dir, data, tmp_path, capsys
):
    """The issue's LoRA lr-100 and GAST lr-1e10 runs exited 0 with a broken adapter."""
    out = tmp_path / "run"
    argv = train_argv(
        model_dir, data, out, "--learning_rate", "1e30", "--max_steps", "6", "--save_steps", "1"
    )
    code, err = cli([*argv, "--optim", "sgd", *method], capsys)
    assert code == 3
    assert_one_error_line(err, "step 2 trained on no sample", "the last good checkpoint is", "checkpoint-1")
    assert no_final_adapter(out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]


def test_max_skipped_steps_lets_a_run_through_its_skipped_steps(model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(model_dir, data, out, "--learning_rate", "1e30", "--max_steps", "3", "--optim", "sgd")
    code, err = cli([*argv, "--max_skipped_steps", "1"], capsys)
    assert code == 3
    assert_one_error_line(
        err, "step 3 trained on no sample", "2 skipped steps, more than max_skipped_steps=1"
    )
    code, err = cli([*argv, "--max_skipped_steps", "2", "--output_dir", str(tmp_path / "r2")], capsys)
    assert code == 0, err
    assert (tmp_path / "r2" / ADAPTER).is_file()


def test_non_finite_weights_after_a_step_stop_the_run_before_that_step_is_saved(tmp_path):
    """The optimizer writes a NaN into one adapter tensor at step 2 (as an overflowing update
    would): the run stops there, names the step and keeps checkpoint-1 as the newest."""
    from transformers import TrainerCallback

    from gastune.errors import TrainingFailed
    from gastune.training import GastuneTrainer
    from tests.helpers import lora_model, row_dataset, sgd_config, stack_rows

    class PoisonAtStep2(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:  # the step being taken is step 2
                next(p for p in model.parameters() if p.requires_grad).data[0, 0] = float("nan")

    model = lora_model()
    out = tmp_path / "run"
    args = sgd_config(
        output_dir=str(out), max_steps=4, save_strategy="steps", save_steps=1, learning_rate=1e-3
    )
    trainer = GastuneTrainer(model=model, args=args, train_dataset=row_dataset(), data_collator=stack_rows)
    trainer.add_callback(PoisonAtStep2())
    with pytest.raises(
        TrainingFailed, match=r"training diverged at step 2: 1 trainable tensors hold NaN/inf"
    ) as info:
        trainer.train()
    assert "\n" not in str(info.value) and f"last good checkpoint is {out / 'checkpoint-1'}" in str(
        info.value
    )
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]
    saved = load_file(out / "checkpoint-1" / ADAPTER)
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_a_skipped_micro_batch_under_gradient_accumulation_does_not_dilute_the_logged_loss(tmp_path):
    """GA 2: the first micro-batch of the step is all NaN and dropped, the second trains. The
    step is not skipped, and its logged loss is that of the micro-batch that trained (what a
    GA-1 run on those rows alone logs), not half of it."""
    from gastune.training import GastuneTrainer
    from tests.helpers import lora_model, row_dataset, sgd_config, stack_rows
    from tests.unit.test_numerics import POISON

    rows = row_dataset(n=8)
    for row in rows[:4]:
        row["input_ids"] = row["input_ids"].clone()
        row["input_ids"][3] = POISON

    def logged_loss(data, **overrides) -> float:
        model = lora_model()
        with torch.no_grad():
            model.get_input_embeddings().weight[POISON] = float("inf")
        args = sgd_config(output_dir=str(tmp_path), train_sampling_strategy="sequential", **overrides)
        trainer = GastuneTrainer(model=model, args=args, train_dataset=data, data_collator=stack_rows)
        trainer.train()
        (log,) = [h for h in trainer.state.log_history if "loss" in h]
        assert log["numerics/skipped_steps"] == 0
        return log["loss"]

    accumulated = logged_loss(rows, gradient_accumulation_steps=2)
    alone = logged_loss(rows[4:])
    assert accumulated == pytest.approx(alone, rel=1e-4)

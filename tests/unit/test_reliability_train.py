"""issue 11 ("nothing silently wrong"), points 1-4, through the real CLI entry on a tiny model
folder: every failure exits non-zero with one ``gastune train: error:`` line and no traceback,
and leaves nothing that looks complete (docs/reliability.md)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.unit._model_folder import save_tiny_llama
from tests.unit.test_bad_input import TINY_TRAIN, assert_one_error_line, cli

ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    records = [{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}."} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def train_argv(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("train", "--model", str(model_dir), "--data", str(data), "--output_dir", str(out), *TINY_TRAIN),
        *("--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--seed", "0", *extra),
    ]


GAST_RUN = ("--method", "gast", "--gast_k", "2", "--max_steps", "2", "--save_steps", "1")


@pytest.fixture(scope="module")
def finished_gast_run(model_dir, data, tmp_path_factory) -> Path:
    """A finished 2-step GAST run with checkpoint-1 and checkpoint-2 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("runs") / "gast"
    assert cli_ok(train_argv(model_dir, data, out, *GAST_RUN))
    return out


def cli_ok(argv: list[str]) -> bool:
    from gastune.cli.main import main

    return main(argv) == 0


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def no_final_adapter(out: Path) -> bool:
    return not (out / ADAPTER).exists() and not (out / "gastune_config.json").exists()


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

    monkeypatch.setattr(run, "load_model", _must_not_load)
    out = tmp_path / "run"
    code, err = cli(["train", "--use_cpu", "true", "--output_dir", str(out), *flags], capsys)
    assert code == 2
    assert_one_error_line(err, fragment)
    assert not out.exists()


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the check")


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

    monkeypatch.setattr(run, "load_model", _must_not_load)
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

    monkeypatch.setattr(run, "load_model", _must_not_load)
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


# ------------------------------------------------------------ 2. one folder, one run
def test_output_dir_equal_to_the_model_folder_is_refused(model_dir, data, capsys, monkeypatch):
    import gastune.training.run as run

    monkeypatch.setattr(run, "load_model", _must_not_load)
    code, err = cli(train_argv(model_dir, data, model_dir), capsys)
    assert code == 2
    assert_one_error_line(err, "is the --model folder")
    assert not (model_dir / ADAPTER).exists()


def test_a_folder_holding_another_run_is_refused_unless_overwritten(
    finished_gast_run, model_dir, data, tmp_path, capsys
):
    out = copy_run(finished_gast_run, tmp_path / "run")
    before = load_file(out / ADAPTER)
    code, err = cli(train_argv(model_dir, data, out, "--max_steps", "1"), capsys)
    assert code == 2
    assert_one_error_line(err, "already holds a run", "--overwrite_output_dir true")
    assert all(torch.equal(before[k], v) for k, v in load_file(out / ADAPTER).items())  # untouched

    # overwriting removes the old run's checkpoints: none of them can be resumed by mistake
    code, err = cli(
        train_argv(model_dir, data, out, "--max_steps", "1", "--overwrite_output_dir", "true"), capsys
    )
    assert code == 0, err
    # only this run's final checkpoint is left (the old run's checkpoint-2 is gone)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    manifest = json.loads((out / "checkpoint-1" / "gastune_checkpoint.json").read_text())
    assert manifest["run"]["method"] == "lora"
    config = json.loads((out / "gastune_config.json").read_text())
    assert config["method"] == "lora"


def test_resume_with_other_settings_lists_the_keys_that_differ(
    finished_gast_run, model_dir, data, tmp_path, capsys
):
    out = copy_run(finished_gast_run, tmp_path / "run")
    checkpoint = str(out / "checkpoint-1")
    argv = train_argv(model_dir, data, out, *GAST_RUN, "--resume_from_checkpoint", checkpoint)
    code, err = cli([*argv, "--per_device_train_batch_size", "2"], capsys)
    assert code == 2
    assert_one_error_line(
        err,
        "was made by a different run: per_device_train_batch_size (4 in the checkpoint, 2 now)",
        "--resume_allow_mismatch true",
    )
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(data.read_text().replace("plus", "times"))
    code, err = cli([*argv, "--data", str(other_data)], capsys)
    assert code == 2
    assert_one_error_line(err, "different run: data (")
    assert (out / "checkpoint-2").is_dir() and not any(out.glob("checkpoint-3"))

    # the override lets non-shape keys differ, with a warning
    code, err = cli([*argv, "--per_device_train_batch_size", "2", "--resume_allow_mismatch", "true"], capsys)
    assert code == 0, err


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--method", "ist"], "method (gast in the checkpoint, ist now)"),
        (["--lora_r", "4"], "lora_r (2 in the checkpoint, 4 now)"),
        (["--lora_r", "4", "--resume_allow_mismatch", "true"], "its adapter cannot be loaded into this one"),
    ],
)
def test_resume_into_another_method_or_adapter_shape_is_one_line(
    flags, fragment, finished_gast_run, model_dir, data, tmp_path, capsys
):
    out = copy_run(finished_gast_run, tmp_path / "run")
    argv = train_argv(
        model_dir, data, out, "--max_steps", "2", "--resume_from_checkpoint", str(out / "checkpoint-1")
    )
    code, err = cli([*argv, *flags], capsys)
    assert code == 2
    assert_one_error_line(err, fragment)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--method", "ist"], "gastune_method_state.pt does not fit method ist (KeyError"),
        (["--method", "gast", "--gast_k", "2", "--lora_r", "4"], "its adapter does not fit this model"),
    ],
)
def test_an_older_checkpoint_without_a_manifest_still_fails_in_one_line(
    flags, fragment, finished_gast_run, model_dir, data, tmp_path, capsys
):
    from gastune.training.checkpoint import MANIFEST_NAME

    out = copy_run(finished_gast_run, tmp_path / "run")
    (out / "checkpoint-1" / MANIFEST_NAME).unlink()
    argv = train_argv(
        model_dir, data, out, "--max_steps", "2", "--resume_from_checkpoint", str(out / "checkpoint-1")
    )
    code, err = cli([*argv, *flags], capsys)
    assert code == 2
    assert_one_error_line(err, fragment)


def test_resuming_a_finished_run_trains_nothing(finished_gast_run, model_dir, data, tmp_path, capsys):
    out = copy_run(finished_gast_run, tmp_path / "run")
    before = load_file(out / ADAPTER)
    state = (out / "checkpoint-2" / "trainer_state.json").read_text()
    code = None
    for value in ("true", str(out / "checkpoint-2")):
        from gastune.cli.main import main

        code = main(train_argv(model_dir, data, out, *GAST_RUN, "--resume_from_checkpoint", value))
        assert code == 0
        assert "had already finished at step 2; nothing trained" in capsys.readouterr().out
    after = load_file(out / ADAPTER)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "checkpoint-2" / "trainer_state.json").read_text() == state
    # asking for more steps is not "finished": it trains on
    code = main(
        train_argv(
            model_dir, data, out, *GAST_RUN[:4], "--max_steps", "3", "--resume_from_checkpoint", "true"
        )
    )
    assert code == 0
    assert (out / "checkpoint-3").is_dir()


# ------------------------------------------------------------ 4. checkpoints verified
def _remove(path: Path) -> None:
    path.unlink()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [_remove, _truncate], ids=["missing", "truncated"])
@pytest.mark.parametrize(
    "name",
    [
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        ADAPTER,
        "gastune_method_state.pt",
        "trainer_state.json",
    ],
)
def test_a_named_damaged_checkpoint_is_one_line_naming_the_file(
    name, damage, finished_gast_run, model_dir, data, tmp_path, capsys, monkeypatch
):
    import gastune.training.run as run

    monkeypatch.setattr(run, "load_model", _must_not_load)  # found before the model loads
    out = copy_run(finished_gast_run, tmp_path / "run")
    damage(out / "checkpoint-1" / name)
    argv = train_argv(model_dir, data, out, *GAST_RUN, "--resume_from_checkpoint", str(out / "checkpoint-1"))
    code, err = cli(argv, capsys)
    assert code == 2
    assert_one_error_line(err, "checkpoint-1 is damaged: ", name)


def test_a_checkpoint_damaged_without_its_manifest_is_still_caught(finished_gast_run, tmp_path):
    """Older checkpoints have no manifest: the files a resume needs, and their readability."""
    from gastune.training.checkpoint import MANIFEST_NAME, verify_checkpoint

    out = copy_run(finished_gast_run, tmp_path / "run")
    folder = out / "checkpoint-1"
    (folder / MANIFEST_NAME).unlink()
    assert verify_checkpoint(folder) is None
    _truncate(folder / "optimizer.pt")
    assert verify_checkpoint(folder) == "optimizer.pt is damaged (not a complete torch.save archive)"
    (folder / "optimizer.pt").unlink()
    assert verify_checkpoint(folder) == "optimizer.pt is missing"


def test_resume_true_falls_back_to_the_newest_complete_checkpoint(
    finished_gast_run, model_dir, data, tmp_path, capsys, caplog
):
    out = copy_run(finished_gast_run, tmp_path / "run")
    (out / "checkpoint-2" / "scheduler.pt").unlink()
    reference = load_file(finished_gast_run / ADAPTER)
    for name in (ADAPTER, "gastune_config.json"):  # as after a crash before the final save
        (out / name).unlink()
    with caplog.at_level(logging.WARNING):
        code, err = cli(
            train_argv(model_dir, data, out, *GAST_RUN, "--resume_from_checkpoint", "true"), capsys
        )
    assert code == 0, err
    assert "resuming from checkpoint-1; skipped checkpoint-2 (scheduler.pt is missing)" in caplog.text
    # it re-did step 2 from checkpoint-1 and reached the uninterrupted run's adapter
    resumed = load_file(out / ADAPTER)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_resume_true_with_no_complete_checkpoint_lists_why(
    finished_gast_run, model_dir, data, tmp_path, capsys
):
    out = copy_run(finished_gast_run, tmp_path / "run")
    (out / "checkpoint-2" / "scheduler.pt").unlink()
    _truncate(out / "checkpoint-1" / "optimizer.pt")
    code, err = cli(train_argv(model_dir, data, out, *GAST_RUN, "--resume_from_checkpoint", "last"), capsys)
    assert code == 2
    assert_one_error_line(
        err,
        "no complete checkpoint in",
        "checkpoint-2 (scheduler.pt is missing)",
        "checkpoint-1 (optimizer.pt is truncated",
    )


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

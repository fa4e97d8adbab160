"""issue 11 ("nothing silently wrong") through the real CLI entry on a tiny model folder,
points 2 (one output folder, one run) and 4 (checkpoints are verified): every failure exits
non-zero with one ``gastune train: error:`` line and no traceback, and leaves nothing that
looks complete (docs/reliability.md)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.unit._model_folder import save_tiny_llama
from tests.unit._reliability import (
    ADAPTER,
    GAST_RUN,
    cli_ok,
    copy_run,
    must_not_load,
    train_argv,
    write_sum_data,
)
from tests.unit.test_bad_input import assert_one_error_line, cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_sum_data(tmp_path_factory.mktemp("data") / "d.jsonl")


@pytest.fixture(scope="module")
def finished_gast_run(model_dir, data, tmp_path_factory) -> Path:
    """A finished 2-step GAST run with checkpoint-1 and checkpoint-2 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("runs") / "gast"
    assert cli_ok(train_argv(model_dir, data, out, *GAST_RUN))
    return out


# ------------------------------------------------------------ 2. one folder, one run
def test_output_dir_equal_to_the_model_folder_is_refused(model_dir, data, capsys, monkeypatch):
    import gastune.training.run as run

    monkeypatch.setattr(run, "load_model", must_not_load)
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

    monkeypatch.setattr(run, "load_model", must_not_load)  # found before the model loads
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

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
def test_invalid_values_fail_in_one_line_before_anything_loads(flags, fragment, tmp_path, capsys, monkeypatch):
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
        code, err = cli([*train_argv(model_dir, data, out, "--max_steps", "1"), "--config", str(config)], capsys)
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
    monkeypatch.setattr(
        output_dir.shutil, "disk_usage", lambda p: real(p)._replace(free=5 * 2**20)
    )
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

"""Shared by the issue-11 CLI tests (test_reliability_train.py, test_reliability_resume.py):
a tiny data file, the ``gastune train`` flags of a tiny run, and small checks on run folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.unit.test_bad_input import TINY_TRAIN

ADAPTER = "adapter_model.safetensors"
# A finished 2-step GAST run that saves checkpoint-1 and checkpoint-2.
GAST_RUN = ("--method", "gast", "--gast_k", "2", "--max_steps", "2", "--save_steps", "1")


def write_sum_data(path: Path) -> Path:
    records = [{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}."} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def train_argv(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("train", "--model", str(model_dir), "--data", str(data), "--output_dir", str(out), *TINY_TRAIN),
        *("--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--seed", "0", *extra),
    ]


def cli_ok(argv: list[str]) -> bool:
    from gastune.cli.main import main

    return main(argv) == 0


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def no_final_adapter(out: Path) -> bool:
    return not (out / ADAPTER).exists() and not (out / "gastune_config.json").exists()


def must_not_load(*args, **kwargs):
    """Stands in for ``load_model`` where a check must fail before the model loads."""
    raise AssertionError("the model was loaded before the check")

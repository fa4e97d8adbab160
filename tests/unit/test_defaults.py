"""Defaults that do not cut answers and runs that show themselves.

The README's data lines and every ``configs/*.yaml`` keep every answer token under the default
(or configured) ``cutoff_len``; a short run with the default ``logging_steps`` logs its loss
and GAST statistics at every step.
"""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest

from gastune.cli.config_args import parse_train_args
from gastune.data import load_commonsense, tokenize_records
from gastune.models import load_tokenizer
from gastune.training import DataConfig, GastuneConfig, GastuneTrainer
from gastune.training.run import load_training_records
from tests.helpers import RecordingCollator, lora_model, row_dataset

REPO = Path(__file__).resolve().parents[2]
GAST_KEYS = ("gast/alignment_chosen", "gast/negative_pick_frac", "gast/usage_cv", "gast/unused_frac")


@functools.cache
def _tokenizer():
    return load_tokenizer("smollm2-135m")


def _assert_every_answer_kept(records: list[dict], cutoff_len: int) -> None:
    """Nothing dropped, nothing cut: each sequence ends with its EOS inside the cutoff."""
    tok = _tokenizer()
    items = tokenize_records(records, tok, cutoff_len=cutoff_len)
    assert len(items) == len(records)
    assert all(item["input_ids"][-1] == tok.eos_token_id for item in items)
    assert max(len(item["input_ids"]) for item in items) <= cutoff_len


def _readme_data_lines() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    return [
        shlex.split(line.split("#")[0]) for line in re.findall(r"^gastune data commonsense .*$", text, re.M)
    ]


def test_readme_data_lines_keep_every_answer_under_the_default_cutoff():
    lines = _readme_data_lines()
    assert lines, "the README no longer shows 'gastune data commonsense'"
    for argv in lines:
        opts = dict(zip(argv[3::2], argv[4::2]))
        records = load_commonsense(
            split=opts.get("--split", "train"),
            per_task=int(opts["--per-task"]),  # a README line without --per-task would be a full mixture
            seed=int(opts.get("--seed", 0)),
            prompt_format=opts.get("--format", "mc"),
            tasks=opts.get("--tasks"),
        )
        _assert_every_answer_kept(records, DataConfig().cutoff_len)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_configs_keep_every_answer(config):
    _, data_cfg, _ = parse_train_args(["--config", str(REPO / "configs" / config), "--use_cpu", "true"])
    _assert_every_answer_kept(load_training_records(data_cfg), data_cfg.cutoff_len)


def test_a_short_run_logs_loss_and_gast_statistics_at_every_step(tmp_path):
    args = GastuneConfig(
        output_dir=str(tmp_path),
        method="gast",
        gast_k=2,
        gast_support_size=2,
        per_device_train_batch_size=4,
        max_steps=3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )  # logging_steps left at its default
    trainer = GastuneTrainer(
        model=lora_model(2), args=args, train_dataset=row_dataset(), data_collator=RecordingCollator()
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3]
    assert all(key in h for h in logs for key in GAST_KEYS)


def test_long_runs_log_about_fifty_times():
    from transformers.trainer_callback import TrainerState

    state = TrainerState()
    state.compute_steps(GastuneConfig(output_dir="x", use_cpu=True, report_to="none"), 1000)
    assert state.logging_steps == 20


@pytest.mark.integration
def test_bare_train_defaults_drop_only_the_few_records_longer_than_the_cutoff(caplog):
    """The whole mixture (``gastune train`` with no data flag): measured 2 of 147,580 dropped."""
    records = load_training_records(DataConfig())
    items = tokenize_records(records, _tokenizer(), cutoff_len=DataConfig().cutoff_len)
    assert len(records) == 147_580 and len(records) - len(items) == 2
    assert "2 of 147580 records lost every completion token to cutoff_len=1024; dropped them" in caplog.text

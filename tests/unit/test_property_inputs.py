"""Property-based tests (issue 11, point 7): whatever bytes, JSON or YAML a user hands the data
reader or the config parser, it either loads or raises ``GastuneError`` (the one-line error
the CLI prints) — never any other exception. Bounded example counts keep this a few seconds."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")  # the dev extra pins it
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gastune.cli.config_args import parse_train_args, valid_keys  # noqa: E402
from gastune.data.io import load_records  # noqa: E402
from gastune.errors import GastuneError  # noqa: E402
from gastune.experiments.grid import grid_from_dict  # noqa: E402
from gastune.experiments.runner import check_grid  # noqa: E402

FAST = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

# JSON values, and record-like objects that mix the schema's field names with anything
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["instruction", "input", "output", "answer", "prompt", "completion", "text", "task"]
records = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=5)


def _loads_or_one_line_error(path: Path) -> None:
    try:
        rows = load_records(path)
    except GastuneError as exc:
        assert "\n" not in str(exc).strip()
        return
    assert rows and all(isinstance(r["prompt"], str) and isinstance(r["completion"], str) for r in rows)


def _file(suffix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix="gastune-prop-")) / f"data{suffix}"


@FAST
@given(raw=st.binary(max_size=200), suffix=st.sampled_from([".json", ".jsonl"]))
def test_random_bytes_load_or_fail_in_one_line(raw, suffix):
    path = _file(suffix)
    path.write_bytes(raw)
    _loads_or_one_line_error(path)


@FAST
@given(value=json_values | st.lists(records, max_size=4), suffix=st.sampled_from([".json", ".jsonl"]))
def test_random_json_documents_load_or_fail_in_one_line(value, suffix):
    path = _file(suffix)
    path.write_text(json.dumps(value))
    _loads_or_one_line_error(path)


@FAST
@given(rows=st.lists(records | json_values, min_size=1, max_size=4))
def test_random_json_lines_load_or_fail_in_one_line(rows):
    path = _file(".jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _loads_or_one_line_error(path)


# ---------------------------------------------------------------- the train config parser
KEYS = valid_keys()
# the options gastune adds, and TrainingArguments ones of every kind (number, bool, choice, list,
# dict-or-string); random values for all ~150 keys would mostly test transformers itself
SOME_KEYS = [
    "model",
    "tuner",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "per_task",
    "tasks",
    "cutoff_len",
    "method",
    "gast_k",
    "gast_selection",
    "gast_temperature",
    "learning_rate",
    "max_steps",
    "per_device_train_batch_size",
    "lr_scheduler_type",
    "save_strategy",
    "label_names",
    "gradient_checkpointing_kwargs",
    "seed",
    "logging_steps",
]
yaml_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
yaml_values = (
    yaml_scalars
    | st.lists(yaml_scalars, max_size=3)
    | st.dictionaries(st.text(max_size=5), yaml_scalars, max_size=2)
)


def _parses_or_one_line_error(path: Path) -> None:
    try:
        parse_train_args(
            ["--config", str(path), "--output_dir", str(path.parent / "run"), "--use_cpu", "true"]
        )
    except GastuneError as exc:
        assert "\n" not in str(exc).strip()


@FAST
@given(config=st.dictionaries(st.sampled_from(SOME_KEYS), yaml_values, max_size=4))
def test_random_yaml_configs_parse_or_fail_in_one_line(config):
    path = _file(".yaml")
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    _parses_or_one_line_error(path)


@FAST
@given(raw=st.binary(max_size=120) | st.text(max_size=120).map(str.encode))
def test_random_bytes_as_a_config_file_fail_in_one_line(raw):
    path = _file(".yaml")
    path.write_bytes(raw)
    _parses_or_one_line_error(path)


@FAST
@given(
    train=st.dictionaries(st.sampled_from(SOME_KEYS), yaml_values, max_size=3),
    evaluation=st.dictionaries(
        st.sampled_from(["per_task", "batch_size", "rule", "seed"]), yaml_values, max_size=2
    ),
    seeds=yaml_values,
)
def test_random_grids_load_or_fail_in_one_line(train, evaluation, seeds):
    try:
        check_grid(grid_from_dict({"methods": ["lora"], "train": train, "eval": evaluation, "seeds": seeds}))
    except GastuneError as exc:
        assert "\n" not in str(exc).strip()

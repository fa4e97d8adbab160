"""Issue 11 (points 3 and 7): data files and config files that are wrong fail in one line,
before any work, through the real CLI entry. Each test asserts the exit code, a single
error line without a traceback, and that nothing that looks complete was written."""

from __future__ import annotations

import json

import pytest

from gastune.cli.config_args import parse_train_args
from gastune.cli.main import main
from gastune.errors import GastuneError
from tests.unit.test_bad_input import GOOD, assert_one_error_line, cli


# ------------------------------------------------------------ data files (point 7)
def test_non_utf8_jsonl_names_the_line_and_byte_offset(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    second = b'{"prompt": "caf\xe9", "completion": "x"}\n'  # latin-1 é
    data.write_bytes((GOOD + "\n").encode() + second)
    code, err = cli(["data", "check", str(data)], capsys)
    assert code == 2
    offset = len(GOOD) + 1 + second.index(b"\xe9")
    assert_one_error_line(err, "d.jsonl line 2: not UTF-8 text", f"byte 0xe9 at byte offset {offset}")


def test_non_utf8_json_names_the_line_and_byte_offset(tmp_path, capsys):
    data = tmp_path / "d.json"
    raw = b'[\n{"text": "ok"},\n{"text": "\xff"}\n]\n'
    data.write_bytes(raw)
    code, err = cli(["data", "check", str(data)], capsys)
    assert code == 2
    offset = raw.index(b"\xff")
    assert_one_error_line(err, "d.json line 3: not UTF-8 text", f"byte offset {offset}")


def test_utf8_byte_order_mark_is_accepted(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + (GOOD + "\n" + GOOD + "\n").encode())
    assert cli(["data", "check", str(data)], capsys)[0] == 0


@pytest.mark.parametrize("indent", [None, 2], ids=["one-line", "pretty"])
def test_json_array_saved_as_jsonl_gets_a_format_hint(tmp_path, capsys, indent):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps([json.loads(GOOD)] * 3, indent=indent) + "\n")
    code, err = cli(["data", "check", str(data)], capsys)
    assert code == 2
    assert_one_error_line(err, "d.jsonl line 1:", "JSON array", "one JSON object per line", "as .json")


def test_non_utf8_config_file(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    raw = b"method: lora\noutput_dir: caf\xe9\n"
    config.write_bytes(raw)
    code, err = cli(["train", "--config", str(config)], capsys)
    assert code == 2
    offset = raw.index(b"\xe9")
    assert_one_error_line(err, f"line 2: not UTF-8 text (byte offset {offset})")


# ------------------------------------------------------------ train configs (point 3)
def test_yaml_lists_and_nulls_in_a_train_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "target_modules: [q_proj, v_proj]\n"  # a comma-separated option
        "label_names: [labels]\n"  # a list option
        "per_task: null\n"  # an option whose default is None
        "tasks: ~\n"
        "gradient_checkpointing_kwargs: {use_reentrant: false}\n"
        "output_dir: -odd-name\n"  # a value starting with '-' is a value, not an option
    )
    model_cfg, data_cfg, config_ = parse_train_args(["--config", str(config), "--lora_r", "4"])
    assert model_cfg.target_modules == "q_proj,v_proj"
    assert model_cfg.lora_r == 4
    assert config_.label_names == ["labels"]
    assert data_cfg.per_task is None and data_cfg.tasks is None
    assert config_.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert config_.output_dir == "-odd-name"


@pytest.mark.parametrize(
    ("yaml_text", "fragments"),
    [
        ("lora_r: null\n", ["config key 'lora_r'", "is null", "default 32"]),
        ("lora_r: [2, 4]\n", ["config key 'lora_r'", "takes one value"]),
        ("target_modules: []\n", ["config key 'target_modules'", "empty list"]),
        ("target_modules: [[q_proj]]\n", ["a list item must be a single value"]),
        ("lora_r: {a: 1}\n", ["config key 'lora_r'", "takes one value, got the mapping"]),
        ("per_task: many\n", ["--per_task", "invalid int value: 'many'", "gastune train --help"]),
    ],
    ids=["null", "list-for-int", "empty-list", "nested-list", "mapping", "bad-int"],
)
def test_bad_yaml_values_are_one_line_not_a_usage_dump(tmp_path, capsys, yaml_text, fragments):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text + f"output_dir: {tmp_path / 'run'}\n")
    code, err = cli(["train", "--config", str(config)], capsys)
    assert code == 2
    assert_one_error_line(err, *fragments)
    assert len(err.strip().splitlines()) == 1, err  # no usage block around it
    assert not (tmp_path / "run").exists()


def test_bad_flag_value_on_the_command_line_is_one_line(capsys):
    code, err = cli(["train", "--learning_rate"], capsys)
    assert code == 2
    assert_one_error_line(err, "--learning_rate", "expected one argument")
    assert len(err.strip().splitlines()) == 1, err


def test_trainingarguments_own_checks_are_one_line(capsys):
    with pytest.raises(GastuneError, match="requires non-zero --logging_steps") as caught:
        parse_train_args(["--logging_strategy", "steps", "--logging_steps", "0"])
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------ bench grids (point 3)
@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ('train:\n  learning_rate: "1e-4"\n', "train: 'learning_rate' must be a number, got '1e-4'"),
        ("train:\n  learning_rate: 1e-4\n", "write it unquoted with a dot"),  # YAML 1.1 reads it as text
        ('train:\n  max_steps: "5"\n', "train: 'max_steps' must be an integer, got '5'"),
        ('train:\n  bf16: "yes"\n', "'bf16' must be true or false"),
        ('eval:\n  per_task: "100"\n', "eval: 'per_task' must be an integer, got '100'"),
    ],
    ids=["quoted-float", "exponent-without-dot", "quoted-int", "quoted-bool", "eval-quoted-int"],
)
def test_quoted_numbers_in_a_grid_fail_at_dry_run(tmp_path, capsys, section, fragment):
    grid = tmp_path / "g.yaml"
    grid.write_text(f"methods: [lora]\nresults: {tmp_path / 'res'}\n" + section)
    code, err = cli(["bench", "--config", str(grid), "--dry-run"], capsys)
    assert code == 2
    assert_one_error_line(err, fragment)
    assert not (tmp_path / "res").exists()


def test_quoted_number_in_a_method_entry_fails_at_dry_run(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text("methods:\n  - {name: g, method: gast, gast_k: '8'}\n")
    code, err = cli(["bench", "--config", str(grid), "--dry-run"], capsys)
    assert code == 2
    assert_one_error_line(err, "methods[0] (g): 'gast_k' must be a number, got '8'")


def test_numbers_and_nulls_in_a_grid_are_accepted(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(
        f"methods: [lora]\nresults: {tmp_path / 'res'}\n"
        "train:\n  learning_rate: 1.0e-4\n  max_steps: 5\n  per_task: null\n  greats_lr: null\n"
    )
    assert main(["bench", "--config", str(grid), "--dry-run", "--set", "learning_rate=1e-3"]) == 0
    assert "lora-seed0" in capsys.readouterr().out


def test_set_takes_an_exponent_as_a_number():
    from types import SimpleNamespace

    from gastune.cli.bench_cmd import build_grid

    args = SimpleNamespace(
        config=None, methods="lora", seeds=None, set=["learning_rate=1e-3", "max_steps=3"], eval_set=[]
    )
    args.results = args.docs = args.threads = args.runs_dir = None
    grid = build_grid(args)
    assert grid.train == {"learning_rate": 1e-3, "max_steps": 3}

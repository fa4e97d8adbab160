"""Bad input through the real CLI entry (``gastune.cli.main.main``): every case exits
non-zero with one clear ``gastune …: error:`` line and no traceback, and leaves no output
that looks complete. One test per case."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from gastune.cli.main import main
from tests.unit._model_folder import save_tiny_llama

TINY_TRAIN = ["--lora_r", "2", "--lora_alpha", "4", "--use_cpu", "true", "--report_to", "none"]
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "gastune_config.json")


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of one CLI call (argparse errors exit via SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_error_line(err: str, *fragments: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"prompt": "What is 1 plus 1?", "completion": " 2."})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


# ------------------------------------------------------------ data files
def test_malformed_json_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, '{"prompt": "a", "completion": '])
    code, err = cli(["data", "check", str(data)], capsys)
    assert code == 2
    assert_one_error_line(err, "d.jsonl line 2: malformed JSON")


def test_missing_field(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, json.dumps({"prompt": "a"})])
    code, err = cli(["data", "check", str(data)], capsys)
    assert code == 2
    assert_one_error_line(err, "line 2: missing field 'completion'")


def test_wrong_type(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"instruction": ["a"], "output": "b"})])
    code, err = cli(["data", "check", str(data)], capsys)
    assert code == 2
    assert_one_error_line(err, "line 1: field 'instruction' must be a string, got list")


def test_a_record_that_is_not_an_object(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, "[1, 2]"])
    code, err = cli(["data", "check", str(data)], capsys)
    assert code == 2
    assert_one_error_line(err, "line 2: expected an object", "got list")


def test_empty_string(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"text": "   "})])
    code, err = cli(["data", "check", str(data)], capsys)
    assert code == 2
    assert_one_error_line(err, "field 'text' is empty")


def test_empty_file(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [])
    code, err = cli(["data", "check", str(data)], capsys)
    assert code == 2
    assert_one_error_line(err, "empty dataset")


def test_over_long_sequences_are_cut_and_counted(tmp_path, model_dir, caplog, capsys):
    long = json.dumps({"prompt": "What is " + "one plus " * 30 + "one?", "completion": " 31."})
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 6 + [long] * 2)
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--cutoff_len", "24"]
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        code, err = cli([*argv, "--output_dir", str(out), "--max_steps", "1", *TINY_TRAIN], capsys)
    assert code == 0, err
    assert "2 of 8 records were cut to cutoff_len=24 tokens" in caplog.text
    # and with the loss on answers only, a cut that leaves no answer token at all is an error
    code, err = cli(
        [*argv, "--train_on_prompt", "false", "--output_dir", str(tmp_path / "r2"), *TINY_TRAIN], capsys
    )
    assert code == 0, err
    assert "2 of 8 records lost every completion token to cutoff_len=24; dropped them" in caplog.text
    only_long = write_jsonl(tmp_path / "long.jsonl", [long])
    argv = ["train", "--model", str(model_dir), "--data", str(only_long), "--cutoff_len", "24"]
    code, err = cli(
        [*argv, "--train_on_prompt", "false", "--output_dir", str(tmp_path / "r3"), *TINY_TRAIN], capsys
    )
    assert code == 2
    assert_one_error_line(err, "no record keeps a completion token within cutoff_len=24")
    assert not (tmp_path / "r3").exists()


# ------------------------------------------------------------ names, keys and flags
def test_unknown_task_name(tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    code, err = cli(["data", "commonsense", "--out", str(out), "--tasks", "boolq,nosuchtask"], capsys)
    assert code == 2
    assert_one_error_line(err, "unknown task(s) nosuchtask", "valid tasks: boolq, piqa")
    assert not out.exists()


def test_unknown_config_key_lists_the_valid_keys(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("method: gast\nlerning_rate: 0.1\n")
    code, err = cli(["train", "--config", str(config)], capsys)
    assert code == 2
    line = assert_one_error_line(err, "unknown config key 'lerning_rate'", "did you mean learning_rate")
    valid = line.split("valid keys: ")[1].split(", ")
    assert {"learning_rate", "gast_k", "model", "data", "cutoff_len"} <= set(valid)


def test_unknown_train_flag(capsys):
    code, err = cli(["train", "--gast_kk", "2"], capsys)
    assert code == 2
    assert_one_error_line(err, "unknown arguments ['--gast_kk', '2']")


def test_unknown_flag_of_a_plain_subcommand(tmp_path, capsys):
    code, err = cli(["data", "check", str(tmp_path / "d.jsonl"), "--bogus"], capsys)
    assert code == 2
    assert_one_error_line(err, "unrecognized arguments: --bogus")


def test_unknown_method(model_dir, tmp_path, capsys):
    code, err = cli(["train", "--method", "gasst", "--model", str(model_dir), *TINY_TRAIN], capsys)
    assert code == 2
    assert_one_error_line(err, "unknown method 'gasst'", "gast")


# ------------------------------------------------------------ models
def test_non_existent_model_path(tmp_path, capsys):
    code, err = cli(
        ["train", "--model", str(tmp_path / "no-model"), "--output_dir", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert_one_error_line(err, "no-model' does not exist")
    assert not (tmp_path / "o").exists()


def _encoder_folder(path: Path, kind: str) -> Path:
    from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

    from gastune.models import load_tokenizer

    if kind == "bert":
        cfg = BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
        BertModel(cfg).save_pretrained(path)
    else:
        cfg = T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
        T5EncoderModel(cfg).save_pretrained(path)
    load_tokenizer("smollm2-135m").save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_a_model_that_is_not_a_causal_lm(kind, tmp_path, capsys):
    """A saved BERT encoder would otherwise load as BertLMHeadModel with a fresh head."""
    folder = _encoder_folder(tmp_path / kind, kind)
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 4)
    out = tmp_path / "o"
    code, err = cli(
        ["train", "--model", str(folder), "--data", str(data), "--output_dir", str(out), *TINY_TRAIN], capsys
    )
    assert code == 2
    assert_one_error_line(err, "is not a causal language model")
    assert not any((out / name).exists() for name in ADAPTER_FILES)


# ------------------------------------------------------------ no partial output
def test_interrupted_data_build_leaves_no_file(tmp_path, capsys, monkeypatch):
    import gastune.data.commonsense as commonsense

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(commonsense, "load_commonsense", interrupted)
    out = tmp_path / "x.jsonl"
    code, err = cli(["data", "commonsense", "--out", str(out), "--tasks", "boolq"], capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_write_failing_half_way_leaves_no_file(tmp_path, capsys, monkeypatch):
    import gastune.data.io as io

    real_dumps, calls = io.json.dumps, []

    def failing_dumps(obj, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device (simulated)")
        return real_dumps(obj, **kwargs)

    monkeypatch.setattr(io.json, "dumps", failing_dumps)
    out = tmp_path / "x.jsonl"
    with pytest.raises(OSError, match="simulated"):
        main(["data", "commonsense", "--out", str(out), "--tasks", "boolq", "--per-task", "5"])
    assert list(tmp_path.iterdir()) == []  # neither x.jsonl nor its temporary file


def test_train_failing_before_training_leaves_no_adapter(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 8)
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--output_dir", str(out), *TINY_TRAIN]
    code, err = cli([*argv, "--resume_from_checkpoint", str(tmp_path / "nope")], capsys)
    assert code == 2
    assert_one_error_line(err, "checkpoint folder", "does not exist")
    assert not any((out / name).exists() for name in ADAPTER_FILES)


def test_train_interrupted_mid_run_leaves_only_complete_checkpoints(model_dir, tmp_path, capsys, monkeypatch):
    from gastune.training.trainer import GastuneMixin

    step = GastuneMixin.training_step

    def interrupt_at_step_2(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 1:
            raise KeyboardInterrupt
        return step(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(GastuneMixin, "training_step", interrupt_at_step_2)
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 8)
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--output_dir", str(out), *TINY_TRAIN]
    code, err = cli([*argv, "--method", "gast", "--max_steps", "3", "--save_steps", "1"], capsys)
    assert code == 130 and "Traceback" not in err
    assert not any((out / name).exists() for name in ADAPTER_FILES)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]
    assert (out / "checkpoint-1" / "adapter_model.safetensors").is_file()


def test_train_that_writes_no_adapter_fails_instead_of_claiming_it_saved(
    model_dir, tmp_path, capsys, monkeypatch
):
    """FSDP with SHARDED_STATE_DICT made ``save_model`` write no adapter while the CLI said it
    saved one (found running configs/fsdp/fsdp2_lora.yaml): simulated by a save that writes nothing."""
    from gastune.training.trainer import GastuneTrainer

    monkeypatch.setattr(GastuneTrainer, "save_model", lambda self, *args, **kwargs: None)
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 8)
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--output_dir", str(out), *TINY_TRAIN]
    code = main([*argv, "--max_steps", "1", "--save_strategy", "no"])
    captured = capsys.readouterr()
    assert code == 2
    assert_one_error_line(captured.err, "no adapter was written to", str(out), "FULL_STATE_DICT")
    assert "saved the" not in captured.out
    assert not (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--format", "rc", "--protocol", "generate"], "--format rc ranks option texts by log-likelihood"),
        (["--gsm8k", "--format", "rc"], "drop --tasks/--split/--protocol/--format"),
        (["--format", "cloze"], "invalid choice: 'cloze'"),
    ],
)
def test_eval_format_conflicts(flags, fragment, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code, err = cli(["eval", *flags, "--out", str(out)], capsys)
    assert code == 2
    assert_one_error_line(err, fragment)
    assert not out.exists()

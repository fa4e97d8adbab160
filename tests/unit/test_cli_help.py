"""``gastune train --help`` leads with gastune's options (--config, every method with a line,
GAST, data), then the Trainer's under their own heading; ``gastune --version`` works."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gastune import __version__
from gastune.cli.config_args import valid_keys
from gastune.cli.main import main
from gastune.cli.train_help import METHOD_HELP, TRAINER_GROUP
from gastune.methods import METHODS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def help_text():
    mp = pytest.MonkeyPatch()
    mp.setenv("COLUMNS", "80")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", "--help"]) == 0
    mp.undo()
    return out.getvalue()


def test_train_help_opens_with_a_description_and_ends_with_examples(help_text):
    assert help_text.startswith("usage: gastune train [--config FILE.yaml] [--method METHOD]")
    assert "Fine-tune a causal LM with a parameter-efficient adapter" in help_text
    examples = help_text[help_text.index("examples:") :]
    assert "gastune train --config configs/gast.yaml" in examples and "gastune data check" in examples


def test_gastune_options_come_first_and_the_trainer_flags_after_their_heading(help_text):
    heading = help_text.index(TRAINER_GROUP + ":")
    own = [
        "--config",
        "--method",
        "--model",
        "--data",
        "--cutoff_len",
        "--chat_loss",
        "--gast_k",
        "--ist_interval",
    ]
    positions = [help_text.index(f"\n  {flag} ") for flag in own]
    assert positions == sorted(positions) and positions[-1] < heading
    for group in ("gastune: what to run:", "model and adapter:", "data:", "GAST (--method gast"):
        assert help_text.index(group) < heading
    for flag in ("--learning_rate", "--num_train_epochs", "--per_device_train_batch_size", "--bf16"):
        assert help_text.index(f"\n  {flag} ") > heading
    for key in valid_keys():  # every option is listed once
        assert len(re.findall(rf"\n  --{re.escape(key)}[ ,\n]", help_text)) == 1, key


def test_every_method_has_one_line_of_help(help_text):
    assert set(METHOD_HELP) == set(METHODS)
    for name, line in METHOD_HELP.items():
        shown = [row for row in help_text.splitlines() if row.strip().startswith(f"{name} ")]
        assert len(shown) == 1 and shown[0].rstrip().endswith(line) and len(shown[0]) <= 80, (name, shown)


def test_dense_is_documented():
    assert "`dense`" in (REPO / "README.md").read_text()
    assert "`dense`" in (REPO / "docs" / "methods.md").read_text()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"gastune {__version__}"

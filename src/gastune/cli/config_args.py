"""Turn ``--config file.yaml`` plus command-line flags into the three config dataclasses.

Every ``TrainingArguments`` flag works. A YAML file supplies defaults that flags override;
an unknown key in the YAML is rejected with the valid keys listed.
"""

from __future__ import annotations

import dataclasses
import difflib

from gastune.errors import GastuneError
from gastune.yaml_file import read_yaml


def _classes():
    from gastune.training.config import DataConfig, GastuneConfig, ModelConfig

    return (ModelConfig, DataConfig, GastuneConfig)


def valid_keys() -> list[str]:
    return sorted(f.name for cls in _classes() for f in dataclasses.fields(cls) if f.init)


def yaml_to_argv(path: str) -> list[str]:
    data = read_yaml(path, "config")
    if not isinstance(data, dict):
        raise GastuneError(f"config file '{path}' must be a mapping of option: value")
    keys = set(valid_keys())
    argv: list[str] = []
    for key, value in data.items():
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise GastuneError(
                f"unknown config key '{key}' in {path}{hint}; valid keys: {', '.join(sorted(keys))}"
            )
        values = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(str(v) for v in values)]
    return argv


def parse_train_args(argv: list[str]):
    """``(ModelConfig, DataConfig, GastuneConfig)`` from ``[--config FILE] [--flag value ...]``."""
    from transformers import HfArgumentParser

    given = command_line_options(argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise GastuneError("--config needs a YAML file")
        argv = yaml_to_argv(argv[i + 1]) + argv[:i] + argv[i + 2 :]
    parser = HfArgumentParser(_classes(), prog="gastune train")
    model_cfg, data_cfg, config, rest = parser.parse_args_into_dataclasses(
        args=join_negative_values(argv), return_remaining_strings=True
    )
    if rest:
        raise GastuneError(f"unknown arguments {rest}; see 'gastune train --help'")
    check_method_flags(config.method, given)
    return model_cfg, data_cfg, config


def command_line_options(argv: list[str]) -> list[str]:
    """The option names written on the command line (``--gast_k 8`` and ``--gast-k=8`` both give
    ``gast_k``), YAML keys excluded."""
    return [a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--") and a != "--config"]


def join_negative_values(argv: list[str]) -> list[str]:
    """``--learning_rate -1e-3`` as ``--learning_rate=-1e-3``: argparse would take ``-1e-3`` for
    an option and answer with its whole usage text; joined, the value reaches the checks of
    ``GastuneConfig`` and gets one line."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _is_negative_number(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _is_negative_number(token: str) -> bool:
    if not token.startswith("-") or token.startswith("--"):
        return False
    try:
        float(token)
    except ValueError:
        return False
    return True


def check_method_flags(method: str, given: list[str]) -> None:
    """A method-specific flag written on the command line for a method that never reads it is
    an error (in a YAML file or the Python API it is a warning: a shared file may set it)."""
    from gastune.training.config import options_ignored_by

    ignored = options_ignored_by(method, given)
    if ignored:
        flags = ", ".join(f"--{name}" for name in ignored)
        raise GastuneError(
            f"{flags} has no effect with --method {method}; drop it or choose a method that uses it"
        )

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

    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise GastuneError("--config needs a YAML file")
        argv = yaml_to_argv(argv[i + 1]) + argv[:i] + argv[i + 2 :]
    parser = HfArgumentParser(_classes(), prog="gastune train")
    model_cfg, data_cfg, config, rest = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if rest:
        raise GastuneError(f"unknown arguments {rest}; see 'gastune train --help'")
    return model_cfg, data_cfg, config

"""Turn ``--config file.yaml`` plus command-line flags into the three config dataclasses.

Every ``TrainingArguments`` flag works. A YAML file supplies defaults that flags override;
an unknown key in the YAML is rejected with the valid keys listed. YAML lists work for list
options (``label_names: [labels]``) and for comma-separated ones (``target_modules: [q_proj,
v_proj]``); ``null`` is the default of an option whose default is ``None``. Every problem —
in the file or on the command line — is one line, never argparse's usage dump.
"""

from __future__ import annotations

import dataclasses
import difflib
import json

from gastune.errors import GastuneError
from gastune.yaml_file import read_yaml

_HELP = "see 'gastune train --help'"


def _classes():
    from gastune.training.config import DataConfig, GastuneConfig, ModelConfig

    return (ModelConfig, DataConfig, GastuneConfig)


def valid_keys() -> list[str]:
    return sorted(f.name for cls in _classes() for f in dataclasses.fields(cls) if f.init)


def _scalar(key: str, value, path: str) -> str:
    if isinstance(value, (dict, list)):
        raise GastuneError(f"config key '{key}' in {path}: a list item must be a single value, got {value!r}")
    return str(value)


def _yaml_value(key: str, value, action, path: str) -> list[str]:
    """The command-line arguments that give ``key`` the YAML ``value`` (``[]``: the default)."""
    flag = f"--{key}"
    if value is None:
        if action.default is None:
            return []  # null is this option's default
        raise GastuneError(
            f"config key '{key}' in {path} is null, but the option has no 'none' value "
            f"(default {action.default!r}); give a value or remove the key"
        )
    if isinstance(value, list):
        items = [_scalar(key, v, path) for v in value]
        if not items:
            raise GastuneError(
                f"config key '{key}' in {path} is an empty list; give a value or remove the key"
            )
        if action.nargs in ("+", "*"):
            if any(item.startswith("-") for item in items):
                raise GastuneError(f"config key '{key}' in {path}: list items may not start with '-'")
            return [flag, *items]
        if action.type is str:  # a comma-separated option, e.g. target_modules
            return [f"{flag}={','.join(items)}"]
        raise GastuneError(f"config key '{key}' in {path} takes one value, got the list {value!r}")
    if isinstance(value, dict):
        if action.type is not str:
            raise GastuneError(f"config key '{key}' in {path} takes one value, got the mapping {value!r}")
        return [f"{flag}={json.dumps(value, default=str)}"]  # e.g. gradient_checkpointing_kwargs
    # --key=value: a value that starts with '-' is never read as another option
    return [f"{flag}={value}"]


def yaml_to_argv(path: str, parser=None) -> list[str]:
    """The YAML file ``path`` as command-line arguments for ``parser`` (``gastune train``'s)."""
    data = read_yaml(path, "config")
    if not isinstance(data, dict):
        raise GastuneError(f"config file '{path}' must be a mapping of option: value")
    parser = parser or _parser()
    keys = set(valid_keys())
    argv: list[str] = []
    for key, value in data.items():
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise GastuneError(
                f"unknown config key '{key}' in {path}{hint}; valid keys: {', '.join(sorted(keys))}"
            )
        argv += _yaml_value(key, value, parser._option_string_actions[f"--{key}"], path)
    return argv


def _parser():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(_classes(), prog="gastune train")

    def error(message: str):  # argparse would print the whole usage (136 lines) and exit
        raise GastuneError(f"{message}; {_HELP}")

    parser.error = error
    return parser


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise GastuneError("--config needs a YAML file")
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith("--config="):
            return arg.partition("=")[2], argv[:i] + argv[i + 1 :]
    return None, argv


def parse_train_args(argv: list[str]):
    """``(ModelConfig, DataConfig, GastuneConfig)`` from ``[--config FILE] [--flag value ...]``."""
    parser = _parser()
    config_file, argv = _split_config(argv)
    given = command_line_options(argv)  # YAML keys excluded
    if config_file is not None:
        argv = yaml_to_argv(config_file, parser) + argv
    try:
        model_cfg, data_cfg, config, rest = parser.parse_args_into_dataclasses(
            args=join_negative_values(argv), return_remaining_strings=True
        )
    except GastuneError:
        raise
    except (ValueError, TypeError, ImportError, OSError) as exc:  # TrainingArguments' own checks
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GastuneError(f"invalid training settings: {reason}") from None
    if rest:
        raise GastuneError(f"unknown arguments {rest}; {_HELP}")
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

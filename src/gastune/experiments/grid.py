"""An experiment grid: methods × seeds on one model, one data set and one budget.

A grid is a YAML file (or the same dict built in Python)::

    name: commonsense-smollm2
    results: docs/experiment/results   # one JSON per (method, seed): <name>-seed<k>.json
    docs: docs/experiment              # table, summary and plots built from the results
    runs_dir: runs/experiment          # adapters (large, not committed)
    seeds: [0, 1, 2]
    train:                             # ModelConfig / DataConfig / GastuneConfig keys, all runs
      model: smollm2-135m
      per_task: 200
      max_steps: 100
    eval:                              # the fixed validation sample every run is scored on
      per_task: 100
    methods:
      - lora
      - gast
      - {name: gast-random, method: gast, gast_selection: random}   # a variant: overrides
      - {name: lora-lr3e-4, method: lora, learning_rate: 3.0e-4, seeds: [0, 1]}  # fewer seeds

An entry's ``seeds`` restrict the grid's: it runs those of the grid's seeds (after ``--seeds``)
that are among them.

Every run gets the same ``train`` settings, its entry's overrides, ``method`` and the seed
(which seeds the adapter's initialisation, the data order and the method's draws; the
training sample itself is fixed by ``data_seed_value`` so every run sees the same data).

Example:
    >>> grid = grid_from_dict({"methods": ["lora", {"name": "gast-topk", "method": "gast",
    ...                        "gast_selection": "topk"}], "seeds": [0, 1]})
    >>> [(r.name, r.seed) for r in grid.runs()]
    [('lora', 0), ('lora', 1), ('gast-topk', 0), ('gast-topk', 1)]
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gastune.data.prompts import PROMPT_FORMATS
from gastune.errors import GastuneError
from gastune.yaml_file import read_yaml

# Set by the runner for every run; a grid cannot override them.
RESERVED = ("method", "seed", "output_dir")
# Defaults for every run that a grid may override: a checkpoint every 16 optimizer steps (the
# last 2 kept, deleted once the run's result file is written), from which an interrupted run
# resumes (gastune.experiments.resume); no experiment trackers.
RUN_DEFAULTS: dict[str, Any] = {
    "save_strategy": "steps",
    "save_steps": 16,
    "save_total_limit": 2,
    "report_to": "none",
    "logging_steps": 5,
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # what a user means as a number


@dataclass(frozen=True)
class MethodEntry:
    """One row of the grid: a display ``name``, the registered ``method`` and its overrides."""

    name: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] | None = None  # a subset of the grid's seeds (default: all of them)


@dataclass(frozen=True)
class RunSpec:
    """One (method entry, seed) run."""

    name: str
    method: str
    seed: int
    overrides: dict[str, Any]

    @property
    def run_id(self) -> str:
        return f"{self.name}-seed{self.seed}"


@dataclass
class EvalSpec:
    """The validation sample every run is scored on, and how it is scored."""

    data: str = "commonsense"  # the packaged tasks, or a JSON/JSONL file of commonsense records
    split: str = "validation"
    tasks: list[str] | None = None
    per_task: int | None = 100
    seed: int = 1234  # fixed: every run is scored on the same questions
    batch_size: int = 16
    protocol: str = "loglik"  # or "generate" (LLM-Adapters)
    format: str = "mc"  # loglik: rank labels (mc, LLM-Adapters) or option texts (rc)
    rule: str = "sum"  # loglik: summed or mean token log-probability
    num_beams: int = 1
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.protocol not in ("loglik", "generate"):
            raise GastuneError(f"eval.protocol must be loglik or generate, got '{self.protocol}'")
        if self.format not in PROMPT_FORMATS:
            raise GastuneError(f"eval.format must be {' or '.join(PROMPT_FORMATS)}, got '{self.format}'")
        if self.rule not in ("sum", "mean"):
            raise GastuneError(f"eval.rule must be sum or mean, got '{self.rule}'")
        if self.format == "rc" and self.protocol != "loglik":
            raise GastuneError("eval.format rc ranks option texts: it needs eval.protocol loglik")
        for name in ("batch_size", "num_beams", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise GastuneError(f"eval.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Grid:
    """Methods × seeds with shared training and evaluation settings (see the module doc)."""

    methods: list[MethodEntry]
    seeds: list[int] = field(default_factory=lambda: [0])
    train: dict[str, Any] = field(default_factory=dict)
    eval: EvalSpec = field(default_factory=EvalSpec)
    name: str = "experiment"
    results: str = "docs/experiment/results"
    docs: str = "docs/experiment"
    runs_dir: str = "runs/experiment"
    threads: int | None = None  # torch CPU threads per run (default: torch's choice)

    def runs(self) -> list[RunSpec]:
        """Every (entry, seed) run, entry by entry (all seeds of one method together). An
        entry with its own ``seeds`` runs only the grid's seeds among them."""
        return [
            RunSpec(e.name, e.method, s, dict(e.overrides))
            for e in self.methods
            for s in self.seeds
            if e.seeds is None or s in e.seeds
        ]

    def result_path(self, run: RunSpec) -> Path:
        return Path(self.results) / f"{run.run_id}.json"

    def settings(self, run: RunSpec) -> dict[str, Any]:
        """The flat training settings of one run: defaults < ``train`` < overrides < run's own."""
        output_dir = str(Path(self.runs_dir) / run.run_id)
        return {
            **RUN_DEFAULTS,
            **self.train,
            **run.overrides,
            "method": run.method,
            "seed": run.seed,
            "output_dir": output_dir,
        }

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["methods"] = [
            {
                "name": e.name,
                "method": e.method,
                **e.overrides,
                **({} if e.seeds is None else {"seeds": list(e.seeds)}),
            }
            for e in self.methods
        ]
        return out


def _config_fields() -> dict[str, type]:
    from gastune.training.config import DataConfig, GastuneConfig, ModelConfig

    return {
        f.name: cls
        for cls in (ModelConfig, DataConfig, GastuneConfig)
        for f in dataclasses.fields(cls)
        if f.init
    }


@functools.cache
def _field_types() -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for cls in dict.fromkeys(_config_fields().values()):
        hints.update(typing.get_type_hints(cls))
    return hints


def _number_kind(hint: Any) -> tuple[type, bool] | None:
    """``(int | float | bool, optional)`` for a field of one of those types, else ``None``."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if union else (hint,)
    kinds = [a for a in args if a is not type(None)]
    if len(kinds) == 1 and kinds[0] in (int, float, bool):
        return kinds[0], type(None) in args
    return None


def _check_value(key: str, value: Any, hint: Any, where: str) -> None:
    """A number/bool field must hold a YAML number/bool: a quoted "1e-4" would reach the
    optimizer as text and fail inside every run, so it fails here, when the grid is read."""
    kind = _number_kind(hint)
    if kind is None:
        return
    expected, optional = kind
    if value is None:
        if optional:
            return
        raise GastuneError(f"{where}: '{key}' is null; give a value or remove the key")
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        return
    wanted = {bool: "true or false", int: "an integer", float: "a number"}[expected]
    hint_text = ""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        hint_text = (
            " (YAML reads a quoted number, or an exponent without a dot such as 1e-4, as text: "
            "write it unquoted with a dot, e.g. 1.0e-4)"
        )
    raise GastuneError(f"{where}: '{key}' must be {wanted}, got {value!r}{hint_text}")


def _check_keys(keys, where: str) -> None:
    """Every key is a training setting the runner does not set itself; a mapping's values
    must also have the setting's type (numbers as numbers)."""
    valid = _config_fields()
    for key in keys:
        if key in RESERVED:
            raise GastuneError(f"{where}: '{key}' is set by the runner for each run; remove it")
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise GastuneError(f"{where}: unknown training key '{key}'{hint}")
        if isinstance(keys, dict):
            _check_value(key, keys[key], _field_types()[key], where)


def _entry(item: Any, i: int) -> MethodEntry:
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict) or "name" not in item:
        raise GastuneError(f"methods[{i}] must be a method name or a mapping with a 'name'")
    item = dict(item)
    name = str(item.pop("name"))
    method = str(item.pop("method", name))
    if not _NAME.fullmatch(name):
        raise GastuneError(f"methods[{i}]: '{name}' is not a usable file name (letters, digits, _ . + -)")
    seeds = item.pop("seeds", None)
    if seeds is not None:
        seeds = _seed_list(seeds, f"methods[{i}] ({name}): seeds")
    _check_keys(item, f"methods[{i}] ({name})")
    return MethodEntry(
        name=name, method=method, overrides=item, seeds=None if seeds is None else tuple(seeds)
    )


def _seed_list(seeds: Any, what: str) -> list[int]:
    seeds = (
        [seeds] if isinstance(seeds, int) else (list(seeds) if isinstance(seeds, (list, tuple)) else seeds)
    )
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise GastuneError(f"{what} must be a list of integers, got {seeds!r}")
    return seeds


def grid_from_dict(data: dict[str, Any]) -> Grid:
    """A validated ``Grid`` from a dict (a parsed YAML file); errors name the bad entry."""
    if not isinstance(data, dict):
        raise GastuneError("a grid must be a mapping (see gastune.experiments.grid)")
    data = dict(data)
    known = {f.name for f in dataclasses.fields(Grid)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise GastuneError(
            f"unknown grid key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}"
        )
    for key, kind in (("methods", list), ("train", dict), ("eval", dict)):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise GastuneError(f"grid key '{key}' must be a {'list' if kind is list else 'mapping'}")
    methods = [_entry(item, i) for i, item in enumerate(data.pop("methods", None) or [])]
    if not methods:
        raise GastuneError("the grid names no methods")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise GastuneError(f"method names must be unique, got {names}")
    train = dict(data.pop("train", None) or {})
    _check_keys(train, "train")
    eval_settings = data.pop("eval", None) or {}
    eval_types = typing.get_type_hints(EvalSpec)
    for key, value in eval_settings.items():
        if key in eval_types:
            _check_value(key, value, eval_types[key], "eval")
    try:
        evaluation = EvalSpec(**eval_settings)
    except TypeError as exc:
        raise GastuneError(f"eval: {exc}") from exc
    seeds = _seed_list(data.pop("seeds", [0]), "seeds")
    return Grid(methods=methods, seeds=seeds, train=train, eval=evaluation, **data)


def load_grid(path: str | Path) -> Grid:
    """Read a grid YAML file.

    Example:
        >>> grid = load_grid("benchmarks/commonsense_grid.yaml")  # doctest: +SKIP
    """
    data = read_yaml(path, "grid")
    return grid_from_dict(data)


def build_configs(settings: dict[str, Any]):
    """``(ModelConfig, DataConfig, GastuneConfig)`` from one run's flat settings."""
    from gastune.training.config import DataConfig, GastuneConfig, ModelConfig

    fields = _config_fields()
    parts: dict[type, dict[str, Any]] = {ModelConfig: {}, DataConfig: {}, GastuneConfig: {}}
    for key, value in settings.items():
        parts[fields[key]][key] = value
    try:
        return (
            ModelConfig(**parts[ModelConfig]),
            DataConfig(**parts[DataConfig]),
            GastuneConfig(**parts[GastuneConfig]),
        )
    except GastuneError:
        raise
    except (ValueError, TypeError, ImportError, OSError) as exc:  # TrainingArguments' own checks
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GastuneError(f"invalid training settings: {reason}") from None

"""Read a user's YAML file with one-line errors (missing file, invalid YAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gastune.errors import GastuneError


def read_yaml(path: str | Path, kind: str = "config") -> Any:
    """The parsed content of ``path`` (``{}`` for an empty file); ``kind`` names it in errors."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise GastuneError(f"{kind} file '{path}' does not exist")
    try:
        return yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise GastuneError(f"{kind} file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from exc

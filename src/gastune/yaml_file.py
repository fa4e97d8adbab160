"""Read a user's YAML file with one-line errors (missing file, not UTF-8, invalid YAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gastune.errors import GastuneError


def read_yaml(path: str | Path, kind: str = "config") -> Any:
    """The parsed content of ``path`` (``{}`` for an empty file); ``kind`` names it in errors.

    Any problem — a missing file, bytes that are not UTF-8, invalid YAML, an impossible date,
    nesting too deep — is a one-line ``GastuneError``; no other exception escapes.
    """
    import yaml

    file = Path(path)
    if not file.is_file():
        raise GastuneError(f"{kind} file '{path}' does not exist")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise GastuneError(
            f"{kind} file '{path}' line {line}: not UTF-8 text (byte offset {exc.start}); save it as UTF-8"
        ) from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise GastuneError(f"{kind} file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    except (ValueError, RecursionError) as exc:  # e.g. a date like 2024-13-45, nesting too deep
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GastuneError(f"{kind} file '{path}' is not valid YAML: {reason}") from None

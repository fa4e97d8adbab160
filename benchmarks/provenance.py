"""Benchmark-side provenance: the library's records plus the README table updater."""

from __future__ import annotations

from pathlib import Path

from gastune.provenance import git_info, machine_info, provenance, write_json

__all__ = ["git_info", "machine_info", "provenance", "update_readme_block", "write_json"]


def update_readme_block(readme: Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} … {end} block to update")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{body}\n{end}{tail}")

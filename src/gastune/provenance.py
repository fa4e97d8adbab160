"""Where a number came from: git commit + dirty flag, machine, date; atomic JSON writes.

Every results file (evaluation, benchmarks, experiments) carries these, so any figure in
the docs can be traced to the code and machine that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def git_info(path: str | Path | None = None) -> dict[str, Any]:
    """``{"commit", "dirty", "changed"}`` of the git checkout holding ``path`` (default: this package).

    ``changed`` lists the tracked files that differ from the commit, so that a reader can tell
    a run made beside regenerated docs from one made with edited code. All are ``None``
    outside a checkout or without git.
    """
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        # rstrip only: a porcelain line's first column is a space for an unstaged edit, and
        # strip() would eat it from the first line and cut its path by one letter.
        return done.stdout.rstrip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    if status is None:
        return {"commit": commit, "dirty": None, "changed": None}
    # porcelain v1: two status letters, a space, the path ("old -> new" for a rename)
    changed = sorted(line[3:].split(" -> ")[-1] for line in status.splitlines() if line.strip())
    return {"commit": commit, "dirty": bool(changed), "changed": changed}


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where the numbers were measured: platform, CPU count, torch version and threads, device."""
    import torch

    name = f"CPU ({os.cpu_count()} cores)"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": name,
    }


def command_line() -> str:
    """This process's command line, as ``python ARGV...`` (shell-quoted)."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def provenance(device: str = "cpu") -> dict[str, Any]:
    """git, machine, UTC date and the command line of this process."""
    return {
        "git": git_info(),
        "machine": machine_info(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
    }


def write_json(path: str | Path, document: dict[str, Any]) -> Path:
    """Write JSON atomically: a temporary file in the same folder, then a rename.

    An interrupted run therefore never leaves a truncated results file behind.

    Example:
        >>> write_json("results.json", {"accuracy": 0.5})  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

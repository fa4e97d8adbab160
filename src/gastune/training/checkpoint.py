"""Checkpoints that resume exactly and are written atomically.

A Trainer checkpoint already holds the adapter, optimizer, scheduler, RNG states and
``trainer_state.json``. Two things are added here:

- **the method's state** (``TrainingMethod.state_dict()``: GAST's support/selection
  generators, IST's scores, …) in ``gastune_method_state.pt`` — one file per rank under
  data parallelism (``gastune_method_state_{rank}.pt``), since every rank draws its own
  selections. It is a plain ``torch.save`` of the dict, read back with
  ``weights_only=True``: a method's state must be made of tensors, numbers, strings and
  lists/tuples/dicts of those (a generator's state is a ``ByteTensor``).
- **atomic publication**: transformers 5.x writes ``checkpoint-N`` in place, so a crash
  half-way leaves a folder that ``get_last_checkpoint`` and ``resume_from_checkpoint=True``
  take for complete. ``GastuneMixin`` therefore has the Trainer write the whole checkpoint
  into ``tmp-checkpoint-N/checkpoint-N`` and renames it to ``checkpoint-N`` only once every
  file (and every rank) is done. ``tmp-*`` names match neither transformers' checkpoint
  pattern (``^checkpoint-\\d+$``) nor its rotation glob (``checkpoint-*``), so a staging folder
  left by a crash is never resumed from or rotated; the next save clears it.
- **a manifest**, ``gastune_checkpoint.json``, written last: every file of the checkpoint with
  its size, and the run's identity (``gastune.training.identity``). ``verify_checkpoint``
  checks it before a resume uses anything (docs/reliability.md), so a missing or truncated
  ``optimizer.pt`` is an error naming the file instead of a silent restart with fresh state.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from gastune.errors import GastuneError

logger = logging.getLogger(__name__)

METHOD_STATE_NAME = "gastune_method_state"
STAGING_PREFIX = "tmp-"
MANIFEST_NAME = "gastune_checkpoint.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin")


def method_state_path(folder: str | os.PathLike, process_index: int, world_size: int) -> Path:
    """Where rank ``process_index`` keeps its method state inside a checkpoint folder."""
    suffix = f"_{process_index}" if world_size > 1 else ""
    return Path(folder) / f"{METHOD_STATE_NAME}{suffix}.pt"


def save_method_state(
    state: dict[str, Any], folder: str | os.PathLike, process_index: int, world_size: int
) -> None:
    """Write a method's ``state_dict()`` (skipped when empty: dense methods have none)."""
    if not state:
        return
    path = method_state_path(folder, process_index, world_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def load_method_state(folder: str | os.PathLike, process_index: int, world_size: int) -> dict | None:
    """The method state saved by this rank, or None when the checkpoint has none."""
    path = method_state_path(folder, process_index, world_size)
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # a damaged file: name it (verify_checkpoint checks its size first)
        raise GastuneError(f"cannot read {path}: {_one_line(exc)}") from exc


def staging_root(run_dir: str | os.PathLike, checkpoint_folder: str) -> Path:
    """The folder the Trainer is pointed at while it writes ``checkpoint_folder``."""
    return Path(run_dir) / f"{STAGING_PREFIX}{checkpoint_folder}"


def clear_staging(root: Path) -> None:
    """Remove what an earlier, interrupted save left behind."""
    if root.exists():
        logger.warning("removing %s, left by an interrupted checkpoint save", root)
        shutil.rmtree(root)


def publish(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a completely written checkpoint into place.

    ``final`` normally does not exist; if it does (the same step saved again), it is
    replaced, keeping the old copy until the new one is in place.
    """
    staged, final = Path(staged), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f"{STAGING_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staged.parent, ignore_errors=True)  # the now empty staging root


def write_manifest(folder: str | os.PathLike, run: dict[str, Any]) -> None:
    """List every file of a fully written checkpoint with its size, plus the run's identity."""
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    (folder / MANIFEST_NAME).write_text(json.dumps({"format": 1, "run": run, "files": files}, indent=1))


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The checkpoint's manifest, or None for a checkpoint without one (older, or a plain Trainer's)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GastuneError(f"checkpoint {folder}: {MANIFEST_NAME} is damaged ({_one_line(exc)})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise GastuneError(f"checkpoint {folder}: {MANIFEST_NAME} is damaged (no file list)")
    return manifest


def verify_checkpoint(folder: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint folder (one phrase naming the file), or None if it is
    complete. Checks the manifest's files and sizes, or for a checkpoint without a manifest
    the files a resume needs; then that ``trainer_state.json`` parses, that every ``.pt`` /
    ``.pth`` at the top is a readable ``torch.save`` archive and that safetensors headers read."""
    folder = Path(folder)
    if not folder.is_dir():
        return "the folder does not exist"
    try:
        manifest = read_manifest(folder)
    except GastuneError as exc:
        return str(exc).split(": ", 1)[-1]
    if manifest is not None:
        for name, size in manifest["files"].items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} is truncated or changed ({path.stat().st_size} bytes, {size} when saved)"
    else:
        problem = _missing_without_manifest(folder)
        if problem:
            return problem
    return _unreadable_file(folder)


def _missing_without_manifest(folder: Path) -> str | None:
    needed = ["trainer_state.json"]
    if not any(folder.glob("global_step*")):  # DeepSpeed keeps its optimizer state there
        needed += ["optimizer.pt", "scheduler.pt"]
    for name in needed:
        if not (folder / name).is_file():
            return f"{name} is missing"
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        return f"{ADAPTER_WEIGHTS[0]} is missing"
    if not any(folder.glob("rng_state*.pth")):
        return "rng_state.pth is missing"
    return None


def _unreadable_file(folder: Path) -> str | None:
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return "trainer_state.json is missing or damaged"
    for path in sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
        try:
            with zipfile.ZipFile(path) as archive:  # reads the central directory at the end
                archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return f"{path.name} is damaged (not a complete torch.save archive)"
    for path in sorted(folder.glob("*.safetensors")):
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception:  # safetensors raises its own error types
            return f"{path.name} is damaged (unreadable safetensors header)"
    return None


def checkpoints_newest_first(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of a run, highest N first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found, reverse=True)]


def resolve_resume(resume: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder to resume from, verified (``verify_checkpoint``).

    ``True``/``"true"``/``"last"`` mean the newest *complete* checkpoint in ``output_dir``
    (as on the command line, where every value is a string): damaged ones are skipped with a
    warning saying why. A named folder must exist and be complete. Raises ``GastuneError``
    otherwise, with one line naming the folder and the file at fault.
    """
    if resume is None or resume is False or (isinstance(resume, str) and resume.lower() in ("", "false")):
        return None
    if resume is True or resume.lower() in ("true", "last"):
        candidates = checkpoints_newest_first(output_dir)
        if not candidates:
            raise GastuneError(f"resume_from_checkpoint: no checkpoint-N folder in {output_dir}")
        skipped = []
        for folder in candidates:
            problem = verify_checkpoint(folder)
            if problem is None:
                if skipped:
                    logger.warning("resuming from %s; skipped %s", folder.name, "; ".join(skipped))
                return str(folder)
            logger.warning("skipping %s: %s", folder, problem)
            skipped.append(f"{folder.name} ({problem})")
        raise GastuneError(
            f"resume_from_checkpoint: no complete checkpoint in {output_dir}: {'; '.join(skipped)}"
        )
    if not Path(resume).is_dir():
        raise GastuneError(f"resume_from_checkpoint: checkpoint folder '{resume}' does not exist")
    problem = verify_checkpoint(resume)
    if problem is not None:
        raise GastuneError(f"resume_from_checkpoint: checkpoint {resume} is damaged: {problem}")
    return str(resume)


def saved_progress(folder: str | os.PathLike) -> dict:
    """``global_step``, ``max_steps`` and ``num_train_epochs`` from a checkpoint's trainer state."""
    state = json.loads((Path(folder) / "trainer_state.json").read_text())
    return {k: state.get(k) for k in ("global_step", "max_steps", "num_train_epochs")}


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())

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
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import get_last_checkpoint

from gastune.errors import GastuneError

logger = logging.getLogger(__name__)

METHOD_STATE_NAME = "gastune_method_state"
STAGING_PREFIX = "tmp-"


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
    return torch.load(path, weights_only=True)


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


def resolve_resume(resume: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder to resume from: ``True``/``"true"``/``"last"`` mean the last
    complete checkpoint in ``output_dir`` (as on the command line, where every value is a
    string); a path must be an existing folder. Raises ``GastuneError`` otherwise."""
    if resume is None or resume is False or (isinstance(resume, str) and resume.lower() in ("", "false")):
        return None
    if resume is True or resume.lower() in ("true", "last"):
        last = get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
        if last is None:
            raise GastuneError(f"resume_from_checkpoint: no checkpoint-N folder in {output_dir}")
        return last
    if not Path(resume).is_dir():
        raise GastuneError(f"resume_from_checkpoint: checkpoint folder '{resume}' does not exist")
    return str(resume)

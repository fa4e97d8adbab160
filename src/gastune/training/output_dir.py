"""Checks on ``output_dir`` made before the model loads (docs/reliability.md).

- it must be writable, with at least ``MIN_FREE_BYTES`` free, so a read-only or full disk is
  found before the work rather than after it;
- it must not be the base model's folder (an adapter saved there is picked up silently
  whenever that folder is loaded as a base);
- it must not hold another run unless the run is resumed (then the checkpoint is checked,
  ``gastune.training.identity``) or ``overwrite_output_dir`` is set (then the other run's
  checkpoints and adapter are deleted first, so the two runs never mix).

Example:
    >>> prepare_output_dir("runs/new", model="smollm2-135m")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from gastune.errors import GastuneError
from gastune.tuners.bottleneck_io import FILES as BOTTLENECK_FILES

logger = logging.getLogger(__name__)

MIN_FREE_BYTES = 100 * 2**20
# What a finished or interrupted run leaves at the top of its folder (peft, Trainer, gastune).
RUN_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "gastune_config.json",
    "trainer_state.json",
    "training_args.bin",
    *BOTTLENECK_FILES,
)


def run_artifacts(folder: Path) -> list[Path]:
    """The files and folders in ``folder`` that belong to a training run."""
    if not folder.is_dir():
        return []
    found = [folder / name for name in RUN_FILES if (folder / name).exists()]
    found += sorted(
        p for p in folder.iterdir() if p.is_dir() and p.name.startswith(("checkpoint-", "tmp-checkpoint-"))
    )
    return found


def check_writable(
    folder: Path,
    min_free: int = MIN_FREE_BYTES,
    what: str = "output_dir",
    needed_for: str = "checkpoints and the adapter",
) -> None:
    """Fail unless ``folder`` (or, if it does not exist yet, its nearest existing parent) takes
    a new file and has ``min_free`` bytes free. Creates nothing that stays. ``what`` names the
    option in the message (``gastune eval`` checks its ``--out`` folder with it too)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise GastuneError(f"{what} {folder}: {existing} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".gastune-write-test-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise GastuneError(f"{what} {folder} is not writable ({exc.strerror or exc})") from exc
    free = shutil.disk_usage(existing).free
    if free < min_free:
        raise GastuneError(
            f"{what} {folder}: only {free / 2**20:.0f} MiB free on its disk, "
            f"at least {min_free / 2**20:.0f} MiB needed for {needed_for}"
        )


def prepare_output_dir(
    output_dir: str | os.PathLike,
    model: str,
    resume: bool = False,
    overwrite: bool = False,
    main: bool = True,
) -> None:
    """Run the checks of the module docstring; with ``overwrite``, delete the other run's
    checkpoints and adapter (only on the ``main`` process of a multi-process run)."""
    folder = Path(output_dir)
    if Path(model).is_dir() and folder.resolve() == Path(model).resolve():
        raise GastuneError(
            f"output_dir {folder} is the --model folder: the adapter would be saved into the base "
            "model and loaded with it from then on; choose another --output_dir"
        )
    if folder.exists() and not folder.is_dir():
        raise GastuneError(f"output_dir {folder} is a file, not a folder")
    check_writable(folder)
    found = run_artifacts(folder)
    if not found or resume:
        return
    names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
    if not overwrite:
        raise GastuneError(
            f"output_dir {folder} already holds a run ({names}); pass --overwrite_output_dir true to "
            "replace it, --resume_from_checkpoint true to continue it, or choose another --output_dir"
        )
    if main:
        logger.warning("overwrite_output_dir: deleting the earlier run in %s (%s)", folder, names)
        for path in found:
            shutil.rmtree(path) if path.is_dir() else path.unlink()

"""Resuming an interrupted grid run from its last training checkpoint, not from step 0.

Every bench run saves Trainer checkpoints in its run folder (``runs_dir/<name>-seed<k>``;
``save_steps`` of ``RUN_DEFAULTS``), written atomically with a manifest and the run's identity
(``gastune.training.checkpoint``). Before training, ``plan_run_dir`` decides:

- the folder holds a complete checkpoint **and** the marker ``gastune_bench_run.json`` says it
  was made with exactly this run's training settings (``training_fingerprint``), **and** the
  checkpoint carries the bench meter's state (step times, wall clock, loss sum): resume from it;
- otherwise (no checkpoint, a damaged one, other settings, no marker): delete what the folder
  holds, with a warning when there was a checkpoint, and start from step 0. Checkpoints of
  different settings are never mixed into a run.

The Trainer's own identity check (``gastune.training.identity``) still runs on resume and
refuses a checkpoint whose model, method, adapter shape, batch or training data differ.

Example:
    >>> plan = plan_run_dir("runs/evidence-a/lora-seed0", settings)  # doctest: +SKIP
    >>> plan.checkpoint, plan.meter["step_times"][:2]  # doctest: +SKIP
    ('runs/evidence-a/lora-seed0/checkpoint-48', [1.31, 1.29])
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gastune.errors import GastuneError
from gastune.provenance import write_json
from gastune.training import checkpoint
from gastune.training.output_dir import run_artifacts

logger = logging.getLogger(__name__)

MARKER_NAME = "gastune_bench_run.json"
METER_NAME = "BenchMeter"  # the meter callback's class name: its key in trainer_state.json
# Settings that decide where and how often checkpoints are written, not what is trained.
CHECKPOINT_KEYS = ("save_strategy", "save_steps", "save_total_limit", "output_dir")


def training_fingerprint(settings: dict[str, Any]) -> str:
    """A fingerprint of the settings that decide what a run trains (not where it saves)."""
    kept = {k: v for k, v in settings.items() if k not in CHECKPOINT_KEYS}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunPlan:
    """Where training starts: ``checkpoint`` (None: from step 0) and the meter state saved in it."""

    checkpoint: str | None = None
    step: int = 0
    meter: dict[str, Any] | None = None


def saved_meter(folder: str | Path) -> dict[str, Any] | None:
    """The bench meter's state saved in a checkpoint's ``trainer_state.json`` (None: none there)."""
    try:
        state = json.loads((Path(folder) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    saved = (state.get("stateful_callbacks") or {}).get(METER_NAME)
    attributes = saved.get("attributes") if isinstance(saved, dict) else None
    if not isinstance(attributes, dict) or len(attributes.get("step_times") or []) != state.get(
        "global_step"
    ):
        return None
    return attributes


def _marker_matches(folder: Path, fingerprint: str) -> bool:
    try:
        return json.loads((folder / MARKER_NAME).read_text()).get("training") == fingerprint
    except (OSError, ValueError, AttributeError):
        return False


def plan_run_dir(output_dir: str | Path, settings: dict[str, Any]) -> RunPlan:
    """Resume from the run folder's newest complete checkpoint of these settings, or clear it.

    Returns the plan; on a fresh start the folder is emptied of run artifacts and the marker
    for ``settings`` is written before any checkpoint can be.
    """
    folder = Path(output_dir)
    fingerprint = training_fingerprint(settings)
    found = checkpoint.checkpoints_newest_first(folder)
    if found:
        reason = None
        if not _marker_matches(folder, fingerprint):
            reason = "they were made with other training settings (or by another tool)"
        else:
            try:
                chosen = checkpoint.resolve_resume("last", folder)
            except GastuneError as exc:
                chosen, reason = None, str(exc)
            meter = saved_meter(chosen) if chosen else None
            if chosen and meter is None:
                reason = f"{Path(chosen).name} holds no bench meter state (step times)"
            if reason is None:
                step = int(checkpoint.saved_progress(chosen)["global_step"])
                logger.info("resuming %s from %s (step %d)", folder, Path(chosen).name, step)
                return RunPlan(checkpoint=chosen, step=step, meter=meter)
        logger.warning(
            "%s holds checkpoints (%s) that cannot be resumed: %s; deleting them and training from step 0",
            folder,
            found[0].name,
            reason,
        )
    for path in run_artifacts(folder):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    write_json(folder / MARKER_NAME, {"training": fingerprint, "settings": settings})
    return RunPlan()


def clear_checkpoints(output_dir: str | Path) -> None:
    """Delete a finished run's checkpoints (its result file is written; the adapter stays)."""
    for folder in checkpoint.checkpoints_newest_first(output_dir):
        shutil.rmtree(folder, ignore_errors=True)

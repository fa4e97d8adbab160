"""After every optimizer step: a run that diverged or trained on nothing stops, loudly.

- **Divergence.** If any trainable parameter holds NaN/inf after the optimizer step, the run
  raises ``TrainingFailed`` naming the step. This happens in ``on_step_end``, before the
  Trainer's save of that step, so no checkpoint with broken weights is written and
  ``train()`` never reaches its final ``save_model``: the last good checkpoint stays the
  newest one.
- **Skipped steps.** A step in which no sample was trained (every sample of every
  micro-batch on every rank was dropped as non-finite, or had no target token) is counted
  and logged as skipped. More than ``max_skipped_steps`` of them (default 0) fail the run,
  and so does a run in which every step was skipped, whatever the allowance.
- **Honest loss.** A skipped micro-batch contributes 0 to the Trainer's running loss; the
  logged ``loss`` and the final ``train_loss`` are re-scaled to the mean over the
  micro-batches that trained, and a log window where nothing trained has no ``loss`` at all
  (``numerics/skipped_steps`` says why), never a loss of 0.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from gastune.errors import TrainingFailed

logger = logging.getLogger(__name__)


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of trainable parameters holding NaN/inf (one device sync for the common case)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.numel()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])
    if bool(finite.all()):
        return []
    return [n for (n, _), ok in zip(named, finite.tolist()) if not ok]


class StepAccounting:
    """Per optimizer step: how many samples trained; per log window and run: how much of the
    Trainer's running loss came from micro-batches that trained (in optimizer-step units)."""

    def __init__(self):
        self.step_samples = 0  # this rank, this optimizer step
        self.step_units = 0.0  # this rank: Σ 1/GA over micro-batches that trained
        self.window_units = 0.0  # all ranks, since the last training log
        self.window_skipped = 0
        self.window_steps = 0
        self.run_units = 0.0  # all ranks, this train() call
        self.run_steps = 0
        self.skipped_steps = 0

    def trained(self, samples: int, ga_steps: int) -> None:
        self.step_samples += samples
        if samples:
            self.step_units += 1.0 / max(ga_steps, 1)

    def end_step(self, accelerator, world_size: int) -> int:
        """Close the step; the number of samples trained on all ranks."""
        counts = torch.tensor([float(self.step_samples), self.step_units], dtype=torch.float64)
        if world_size > 1:  # every rank takes the same decision, so none waits on another
            counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
        samples, units = int(counts[0]), float(counts[1])
        self.step_samples, self.step_units = 0, 0.0
        self.window_units += units
        self.run_units += units
        self.run_steps += 1
        self.window_steps += 1
        if samples == 0:
            self.skipped_steps += 1
            self.window_skipped += 1
        return samples

    def fix_logged_loss(self, logs: dict, world_size: int) -> dict:
        """``logs`` with the loss as the mean over micro-batches that trained."""
        logs = {**logs, "numerics/skipped_steps": float(self.window_skipped)}
        expected = self.window_steps * world_size
        if self.window_units == 0:
            logs.pop("loss", None)
        elif self.window_units < expected - 1e-9:
            logs["loss"] = logs["loss"] * expected / self.window_units
        self.window_units, self.window_skipped, self.window_steps = 0.0, 0, 0
        return logs

    def fixed_train_loss(self, loss: float, world_size: int) -> float:
        expected = self.run_steps * world_size
        if self.run_units == 0 or self.run_units >= expected - 1e-9:
            return loss
        return loss * expected / self.run_units


class StepCheck(TrainerCallback):
    """Runs the checks above at the end of every optimizer step (see the module docstring)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        step = state.global_step
        bad = nonfinite_parameters(trainer.model)
        if bad:
            raise TrainingFailed(
                f"training diverged at step {step}: {len(bad)} trainable tensors hold NaN/inf "
                f"(first: {bad[0]}); no adapter was saved, {_last_good(args.output_dir)}; "
                "lower --learning_rate or enable --max_grad_norm"
            )
        accounting = trainer.step_accounting
        if accounting.end_step(trainer.accelerator, args.world_size) > 0:
            return control
        allowed = getattr(args, "max_skipped_steps", 0)
        logger.warning(
            "step %d trained on no sample (all dropped as non-finite or without a target token): "
            "skipped (%d so far, max_skipped_steps=%d)",
            step,
            accounting.skipped_steps,
            allowed,
        )
        if accounting.skipped_steps > allowed:
            raise TrainingFailed(
                f"step {step} trained on no sample (every sample dropped as non-finite or without a "
                f"target token): {accounting.skipped_steps} skipped steps, more than "
                f"max_skipped_steps={allowed}; no adapter was saved, {_last_good(args.output_dir)}"
            )
        return control


def _last_good(output_dir: str) -> str:
    try:
        last = get_last_checkpoint(output_dir)
    except (OSError, ValueError):
        last = None
    return f"the last good checkpoint is {last}" if last else "and no checkpoint was saved"

"""Trainer integration: a mixin that works with transformers' Trainer and trl's SFTTrainer.

The mixin changes what a step is: the loss is the mean over samples of each sample's mean
token loss (the unit every method selects on, identical for all methods so comparisons are
fair), and each training step is delegated to the chosen method, which may wrap the ordinary
forward + backward (GAST arms its engine around it). Samples with a non-finite loss or no
target token are taken out of the step first (``gastune.training.numerics``).

It also makes checkpoints complete and safe: each one carries the method's state and is
published atomically, so a resumed run reproduces the uninterrupted one
(``gastune.training.checkpoint``, docs/distributed.md).

Example:
    >>> trainer = GastuneTrainer(model=peft_model, args=GastuneConfig(method="gast"),  # doctest: +SKIP
    ...                          train_dataset=ds, data_collator=collator)
    >>> trainer.train()  # doctest: +SKIP

With trl: ``class GastSFTTrainer(GastuneMixin, SFTTrainer): pass`` and pass
``method=GastMethod(...)`` (an SFTConfig has no GAST fields).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch
from transformers import Trainer, TrainerState
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, rotate_checkpoints

from gastune.engine.fused_loss import model_per_sample_loss
from gastune.engine.loss import per_sample_loss
from gastune.engine.support import SUPPORT_ROWS_KEY, one_pass_loss
from gastune.errors import GastuneError, TrainingFailed
from gastune.methods import TrainingMethod, build_method
from gastune.methods.layerwise import LayerwiseMethod
from gastune.models.quantization import is_quantized
from gastune.training import checkpoint, identity
from gastune.training.fsdp_resume import lenient_optimizer_state_loading
from gastune.training.health import StepAccounting, StepCheck
from gastune.training.numerics import NonFiniteLoss, SampleGuard, has_targets, zero_gradient_loss
from gastune.training.zero3 import skip_frozen_subgroups, zero3_optimizer
from gastune.tuners import has_bottleneck, is_bottleneck_folder, save_bottleneck
from gastune.tuners.bottleneck_io import load_bottleneck_weights

logger = logging.getLogger(__name__)

# Collator keys that are bookkeeping, not model inputs.
NON_MODEL_KEYS = ("labels", "index", "completion_mask", "assistant_masks", SUPPORT_ROWS_KEY)


class GastuneMixin:
    """Mix into any ``transformers.Trainer`` subclass (put it first in the bases)."""

    def __init__(self, *args, method: TrainingMethod | None = None, support_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        # Our loss is a per-sample mean: let the Trainer divide it by gradient accumulation.
        self.loss_is_scaled_for_ga = False
        self.method = (
            method if method is not None else build_method(self.args, support_dataset=support_dataset)
        )
        self._method_ready = False
        self._method_state: tuple | None = None  # (state, file) from a checkpoint, applied after setup()
        self._staging_dir: str | None = None  # where _save_checkpoint is writing, while it is
        self.sample_guard = SampleGuard()
        self.step_accounting = StepAccounting()  # gastune.training.health
        self.add_callback(StepCheck(self))
        self._identity: dict | None = None
        self._resume_mismatch: list[str] = []  # identity keys allowed to differ on this resume
        check_sharding(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        if return_outputs:  # the caller wants the logits (evaluation with predictions)
            outputs = model(**model_inputs)
            losses = per_sample_loss(outputs.logits, labels)  # (N,)
        else:  # fused with the output projection when possible: the batch's logits never exist
            losses, outputs = model_per_sample_loss(
                model, model_inputs, labels, unwrapped=self.accelerator.unwrap_model(model)
            )
        support_rows = inputs.get(SUPPORT_ROWS_KEY, 0)  # GAST's one-pass support rows, last
        if self.sample_guard.active:
            finite = torch.isfinite(losses.detach())
            finite[len(finite) - support_rows :] = True  # a bad support row is left out, not re-run
            if not finite.all():  # before any backward: training_step re-runs without these rows
                raise NonFiniteLoss(inputs, ~finite)
        loss = one_pass_loss(losses, support_rows)[0] if support_rows else losses.mean()
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        if not self._method_ready:
            self.method.setup(self, model)  # seeds the method's generators…
            self._method_ready = True
            if self.is_deepspeed_enabled and is_deepspeed_zero3_enabled():  # layers a method freezes
                skip_frozen_subgroups(zero3_optimizer(self.optimizer))
            if self._method_state is not None:  # …so a resumed state goes in after it
                self._apply_method_state(*self._method_state)
                self._method_state = None
        # See gastune.training.numerics: samples that cannot train are taken out of the step.
        inputs = self.sample_guard.drop_no_target(inputs)
        ga_steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        while True:
            try:
                loss = self._method_step(model, inputs, num_items_in_batch)
                self.step_accounting.trained(int(has_targets(inputs["labels"]).sum()), ga_steps)
                return loss
            except NonFiniteLoss as bad:
                inputs = self.sample_guard.drop_nonfinite(inputs, bad)
                # The re-run uses the unwrapped model: another forward of the DDP wrapper
                # would start collectives (buffer broadcast) the other ranks never join.
                model = self.accelerator.unwrap_model(model)
                if inputs is None:  # skipped: counted by gastune.training.health, loss not logged
                    self.accelerator.backward(zero_gradient_loss(model))
                    self.step_accounting.trained(0, ga_steps)
                    return torch.zeros((), device=self.args.device)

    def plain_training_step(self, model, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """The wrapped Trainer's ordinary forward + backward, with no method around it (what a
        method calls to train on a subset of the micro-batch)."""
        return super().training_step(model, inputs, num_items_in_batch)

    def _method_step(self, model, inputs: dict[str, Any], num_items_in_batch) -> torch.Tensor:
        def run() -> torch.Tensor:
            return self.plain_training_step(model, inputs, num_items_in_batch)

        self.sample_guard.active = True
        try:
            loss = self.method.training_step(self, model, inputs, run)
        finally:
            self.sample_guard.active = False
        engine = _selection_engine(self.method)
        if engine is not None:
            self.sample_guard.check_scores(engine.records, inputs["input_ids"].shape[0])
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: add what the method measured since the last one
            logs = {**logs, **self.method.metrics(), **self.sample_guard.metrics()}
            logs = self.step_accounting.fix_logged_loss(logs, self.args.world_size)
        if "train_loss" in logs:  # the end of train(): in place, so the returned metrics agree
            logs["train_loss"] = self.step_accounting.fixed_train_loss(
                logs["train_loss"], self.args.world_size
            )
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------ checkpoints
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """The Trainer's ``train``, with the checks of docs/reliability.md: the checkpoint is
        verified and must come from the same run; a finished run is not trained again; a run
        that trained on no sample fails."""
        resume = checkpoint.resolve_resume(resume_from_checkpoint, self.args.output_dir)
        self.step_accounting = StepAccounting()
        self._resume_mismatch = []
        earlier = checkpoint.checkpoints_newest_first(self.args.output_dir) if resume is None else []
        if earlier:  # new checkpoints would mix with another run's (docs/reliability.md)
            if not getattr(self.args, "overwrite_output_dir", False):
                raise GastuneError(
                    f"output_dir {self.args.output_dir} already holds checkpoints of another run "
                    f"({earlier[0].name}); resume it, set overwrite_output_dir, or choose another output_dir"
                )
            if self.args.should_save:
                logger.warning("overwrite_output_dir: deleting %d earlier checkpoints", len(earlier))
                for folder in earlier:
                    shutil.rmtree(folder)
            self.accelerator.wait_for_everyone()
        if resume is not None:
            finished = self._check_resume(resume)
            if finished is not None:
                return finished
        output = super().train(resume, *args, **kwargs)
        accounting = self.step_accounting
        if accounting.run_steps and accounting.run_units == 0:
            raise TrainingFailed(
                f"all {accounting.run_steps} steps trained on no sample (every sample was dropped as "
                "non-finite or had no target token); no adapter was saved"
            )
        return TrainOutput(
            output.global_step, output.metrics.get("train_loss", output.training_loss), output.metrics
        )

    def run_identity(self) -> dict:
        """What this run is (``gastune.training.identity``); saved in every checkpoint."""
        if self._identity is None:
            self._identity = identity.run_identity(self)
        return self._identity

    def _check_resume(self, resume: str) -> TrainOutput | None:
        """Refuse a checkpoint of another run; for a finished run, load its final weights and
        return its result instead of training further."""
        manifest = checkpoint.read_manifest(resume)
        self._resume_mismatch = identity.check_same_run(
            (manifest or {}).get("run"),
            self.run_identity(),
            resume,
            allow=getattr(self.args, "resume_allow_mismatch", False),
        )
        identity.check_adapter_shapes(self.accelerator.unwrap_model(self.model), resume)
        progress = checkpoint.saved_progress(resume)
        if not _finished(progress, self.args):
            return None
        step = progress["global_step"]
        logger.warning(
            "%s is the end of a finished run (step %d of %d): nothing to train", resume, step, step
        )
        self._load_from_checkpoint(resume)
        self.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
        return TrainOutput(step, float("nan"), {"already_finished_at_step": step})

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being written, the Trainer writes into the staging folder.
        return self._staging_dir if self._staging_dir is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint plus the method's state, published atomically (see
        ``gastune.training.checkpoint``)."""
        run_dir = super()._get_output_dir(trial)
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        root = checkpoint.staging_root(run_dir, folder)
        if self.args.should_save:
            checkpoint.clear_staging(root)
        self.accelerator.wait_for_everyone()
        self._staging_dir = str(root)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        staged = root / folder
        if not self.args.save_only_model:
            checkpoint.save_method_state(
                self.method.state_dict(), staged, self.args.process_index, self.args.world_size
            )
        self.accelerator.wait_for_everyone()  # every rank has written its files
        if self.args.should_save:
            self._fix_best_checkpoint(run_dir, staged)
            checkpoint.write_manifest(staged, self.run_identity())  # last: it lists the sizes
            checkpoint.publish(staged, os.path.join(run_dir, folder))
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _fix_best_checkpoint(self, run_dir: str, staged) -> None:
        """The Trainer looked for the best checkpoint in the staging folder: point it at the
        published one, and re-write the staged ``trainer_state.json`` to say so."""
        if not self.state.best_global_step:
            return
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
        if self.state.best_global_step == self.state.global_step or os.path.exists(best):
            self.state.best_model_checkpoint = best
            self.state.save_to_json(os.path.join(staged, "trainer_state.json"))

    def _load_optimizer_and_scheduler(self, resume_from_checkpoint: str | None) -> None:
        # Called exactly once when training resumes, under every backend (DDP, FSDP, DeepSpeed).
        if getattr(self, "is_fsdp_enabled", False):
            with lenient_optimizer_state_loading():  # layers not trained yet have no state
                super()._load_optimizer_and_scheduler(resume_from_checkpoint)
        else:
            super()._load_optimizer_and_scheduler(resume_from_checkpoint)
        if resume_from_checkpoint is None:
            return
        state = checkpoint.load_method_state(
            resume_from_checkpoint, self.args.process_index, self.args.world_size
        )
        if "method" in self._resume_mismatch:  # allowed by resume_allow_mismatch
            logger.warning(
                "%s was made with another method: its method state is not loaded", resume_from_checkpoint
            )
            return
        if state is None:
            if self.method.state_dict():
                logger.warning(
                    "%s holds no state for method %s (rank %d): its random draws restart, so the "
                    "resumed run will not reproduce the uninterrupted one",
                    resume_from_checkpoint,
                    self.method.name,
                    self.args.process_index,
                )
            return
        source = str(
            checkpoint.method_state_path(
                resume_from_checkpoint, self.args.process_index, self.args.world_size
            )
        )
        if self._method_ready:
            self._apply_method_state(state, source)
        else:
            self._method_state = (state, source)

    def _apply_method_state(self, state: dict, source: str) -> None:
        try:
            self.method.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise GastuneError(
                f"{source} does not fit method {self.method.name} ({type(exc).__name__}: {exc}); "
                "was the checkpoint made with another --method?"
            ) from exc

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A model with gastune's series/parallel adapters saves only those (the base model is
        a ``PreTrainedModel`` the Trainer would save whole); any other model as the Trainer does."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not has_bottleneck(model):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_bottleneck(model, output_dir, state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = model if model is not None else self.model
        if has_bottleneck(target) and is_bottleneck_folder(resume_from_checkpoint):
            load_bottleneck_weights(target, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


def _finished(progress: dict, args) -> bool:
    """A checkpoint is the end of the run being asked for: its step reached its schedule's end,
    and this run asks for no more steps or epochs than that schedule had."""
    step, saved_max = progress.get("global_step") or 0, progress.get("max_steps") or 0
    if not step or step < saved_max:
        return False
    if args.max_steps > 0:
        return args.max_steps <= step
    return args.num_train_epochs <= (progress.get("num_train_epochs") or 0)


def check_sharding(trainer) -> None:
    """Refuse the combinations with parameter sharding that are not supported, in one line.

    Every method trains under FSDP2 and DeepSpeed ZeRO-3: the engine takes its gradients with
    respect to the tensors each block's forward really used (``gastune.engine.live``: FSDP2's
    gathered copies; under ZeRO-3 the parameters, gathered for the whole block) and delivers them
    through the block's gate into their ``.grad``, which FSDP2 / ZeRO-3 reduce-scatter as usual.
    Refused: sparse methods under FSDP1 (flat parameters: one ``requires_grad`` per flat tensor),
    and a bitsandbytes-quantised base under any kind of sharding. Dense LoRA/DoRA are plain
    Trainer training.
    """
    stage = _deepspeed_stage(trainer)
    if stage in (1, 2) and isinstance(trainer.method, LayerwiseMethod):
        # ZeRO-1/2 step one flat fp32 partition per parameter group, with zeros for a frozen
        # tensor's gradient: AdamW would still decay and move the layers the method froze.
        raise GastuneError(
            f"method '{trainer.method.name}' freezes layers per step, which DeepSpeed ZeRO-{stage} "
            "would still update (one flat partition per parameter group); use DeepSpeed ZeRO-3 "
            "(configs/deepspeed/zero3.json), FSDP2 or data parallel"
        )
    sharded = None
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
        version = getattr(plugin, "fsdp_version", 1)
        sharded = f"FSDP{version}"
    elif stage == 3:
        sharded = "DeepSpeed ZeRO-3"
    if sharded is None:
        return
    if is_quantized(trainer.model):
        raise GastuneError(
            f"a 4-bit/8-bit (bitsandbytes) base is not supported under {sharded}; "
            "use data parallel (configs/accelerate/ddp_*.yaml) or DeepSpeed ZeRO-2"
        )
    if type(trainer.method) is TrainingMethod or sharded in ("FSDP2", "DeepSpeed ZeRO-3"):
        return
    raise GastuneError(
        f"method '{trainer.method.name}' does not support {sharded} (parameter sharding); "
        "use FSDP2 (fsdp_version: 2), DeepSpeed ZeRO-3 or ZeRO-2, data parallel "
        "(configs/accelerate/ddp_*.yaml), or a dense method"
    )


def _deepspeed_stage(trainer) -> int | None:
    """The ZeRO stage of a DeepSpeed run, or ``None`` without DeepSpeed."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return 3 if is_deepspeed_zero3_enabled() else getattr(plugin, "zero_stage", None)


def _selection_engine(method):
    """The GAST engine a method selects with (GAST itself, or wrapped as in gast+ist)."""
    for candidate in (method, getattr(method, "inner", None)):
        engine = getattr(candidate, "engine", None)
        if engine is not None and hasattr(engine, "records"):
            return engine
    return None


class GastuneTrainer(GastuneMixin, Trainer):
    """``transformers.Trainer`` training with the method in ``args.method``."""

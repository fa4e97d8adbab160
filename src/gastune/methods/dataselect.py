"""Data-only online selection: every layer trains on the same chosen samples of each batch.

The data × layer mask of these methods sets whole rows. Per micro-batch of N candidates,
``round(select_fraction · N)`` rows (half by default) are kept by:

- ``maxloss`` — the highest per-sample losses (a forward pass without gradients);
- ``random-half`` — a uniform random draw (no scoring pass);
- ``gradnorm`` — the largest per-sample gradient norm ‖g_i‖ over all adapter tensors in the
  decoder blocks;
- ``greats`` — GREATS (Wang et al., "GREATS: Online Selection of High-Quality Data for LLM
  Training in Every Iteration", NeurIPS 2024): utility lr·⟨g_i, g_val⟩ minus interactions
  lr²·Σ_{j picked}⟨g_i, g_j⟩, picked greedily; g_val is the mean gradient of a validation
  batch of ``greats_val_size`` (default 2) rows drawn each step from the training set or a
  held-out set; lr is the step's learning rate (or ``greats_lr``). The candidate batch is the
  micro-batch itself (the paper draws twice the training batch; here every method sees the
  same N candidates, so per-step compute stays comparable).

The update is the gradient of the mean loss over the kept rows — the same as 0/1 loss weights
renormalised over the kept rows — but the unkept rows are dropped from the training pass
(real savings: it runs on half the batch). Scoring passes (gradnorm, greats: one forward +
backward with per-sample gradients through the GAST engine's score-only mode, see
``gastune.methods.persample``; maxloss: one forward) run in training mode, like the training
pass. Trainable parameters outside the decoder blocks (e.g. a ``modules_to_save`` head) get
the mean over the kept rows but take no part in gradnorm/greats scores. Each rank selects
among its own samples.
"""

from __future__ import annotations

from typing import Any

import torch

from gastune.engine import support_gradients
from gastune.engine.loss import per_sample_loss
from gastune.errors import GastuneError
from gastune.methods.base import TrainingMethod, register_method
from gastune.methods.persample import PerSampleGradients
from gastune.methods.rows import RowSource
from gastune.models.blocks import find_decoder_blocks
from gastune.selection.data_policies import greats_greedy, keep_count, random_rows, top_rows
from gastune.selection.layer_policies import row_mask

POLICIES = ("maxloss", "random-half", "gradnorm", "greats")


def train_on_rows(trainer, model, inputs: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
    """The Trainer's ordinary forward + backward on ``rows`` of the micro-batch only."""
    n = inputs["input_ids"].shape[0]
    subset = {
        key: value.index_select(0, rows.to(value.device))
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n
        else value
        for key, value in inputs.items()
    }
    return trainer.plain_training_step(model, subset)


class DataSelectMethod(TrainingMethod):
    """Keep a fraction of each micro-batch's samples, chosen by ``policy``.

    Args:
        policy: ``maxloss``, ``random-half``, ``gradnorm`` or ``greats``.
        fraction: share of the micro-batch kept (0.5).
        val_size / val / val_dataset: GREATS' validation batch: its size, and whether it is
            drawn from the training set (``train``) or ``val_dataset`` (``heldout``).
        lr: GREATS' learning rate; None uses the step's scheduled learning rate.
        seed: seeds the random draws (offset by the rank: each rank selects its own rows).
    """

    def __init__(
        self,
        policy: str,
        fraction: float = 0.5,
        val_size: int = 2,
        val: str = "train",
        val_dataset=None,
        lr: float | None = None,
        seed: int = 0,
        keep_masks: int = 256,
    ):
        if policy not in POLICIES:
            raise GastuneError(f"unknown data selection '{policy}'; choose one of {', '.join(POLICIES)}")
        if not 0 < fraction <= 1:
            raise GastuneError(f"select_fraction must be in (0, 1], got {fraction}")
        if val not in ("train", "heldout"):
            raise GastuneError(f"greats_val must be train or heldout, got '{val}'")
        if val_size < 1:
            raise GastuneError(f"greats_val_size must be ≥ 1, got {val_size}")
        if policy == "greats" and val == "heldout" and val_dataset is None:
            raise GastuneError("greats_val=heldout needs a held-out set (--support_data)")
        self.name = policy
        self.policy, self.fraction, self.val_size, self.val = policy, fraction, val_size, val
        self.val_dataset, self.lr, self.seed, self.keep_masks = val_dataset, lr, seed, keep_masks
        self.scorer: PerSampleGradients | None = None
        self.masks: list[tuple[int, torch.Tensor]] = []
        self.last_scores: torch.Tensor | None = None
        self._stats: list[tuple[float, float]] = []
        self._val_gen = torch.Generator()
        self._row_gen = torch.Generator()

    def setup(self, trainer, model) -> None:
        unwrapped = trainer.accelerator.unwrap_model(model)
        self.n_layers = len(find_decoder_blocks(unwrapped))
        rank = trainer.args.process_index
        self._val_gen.manual_seed(self.seed * 1000 + 2 * rank + 1)
        self._row_gen.manual_seed(self.seed * 1000 + 2 * rank + 2)
        if self.policy in ("gradnorm", "greats"):
            self.scorer = PerSampleGradients(unwrapped)
        if self.policy == "greats":
            dataset = self.val_dataset if self.val == "heldout" else trainer.train_dataset
            self.val_rows = RowSource(trainer, dataset, "GREATS validation")

    def choose(
        self, trainer, model, inputs: dict[str, Any], k: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(kept rows, per-sample scores or None)`` for one micro-batch."""
        n = inputs["input_ids"].shape[0]
        if self.policy == "random-half":
            return random_rows(n, k, self._row_gen), None
        batch = trainer._prepare_inputs(inputs)
        unwrapped = trainer.accelerator.unwrap_model(model)
        unwrapped.train()
        if self.policy == "maxloss":
            with torch.no_grad(), trainer.compute_loss_context_manager():
                out = unwrapped(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
                losses = per_sample_loss(out.logits, batch["labels"]).double().cpu()
            return top_rows(losses, k), losses
        assert self.scorer is not None
        context = trainer.compute_loss_context_manager()
        if self.policy == "gradnorm":
            scores = self.scorer.score(batch, context=context).sq_norms.sqrt()
            return top_rows(scores, k), scores
        picks = torch.randperm(len(self.val_rows), generator=self._val_gen)[: self.val_size].tolist()
        val_batch = self.val_rows.batch(picks)
        with trainer.compute_loss_context_manager():
            val_grad = support_gradients(
                unwrapped, val_batch, self.scorer.block_parameters, blocks=self.scorer.engine.blocks.blocks
            )
        measured = self.scorer.score(batch, gram=True, reference=val_grad, context=context)
        lr = self.lr if self.lr is not None else float(trainer.lr_scheduler.get_last_lr()[0])
        return torch.sort(
            greats_greedy(measured.ref_dots, measured.gram, k, lr)
        ).values, lr * measured.ref_dots

    def training_step(self, trainer, model, inputs, run):
        n = inputs["input_ids"].shape[0]
        rows, scores = self.choose(trainer, model, inputs, keep_count(self.fraction, n))
        self.last_scores = scores
        if scores is not None:
            finite = torch.isfinite(scores)
            kept = scores[rows][finite[rows]]
            self._stats.append((float(kept.mean()), float(scores[finite].mean())))
        if self.keep_masks:
            self.masks.append((trainer.state.global_step, row_mask(n, self.n_layers, rows)))
            del self.masks[: -self.keep_masks]
        return train_on_rows(trainer, model, inputs, rows)

    def metrics(self) -> dict[str, float]:
        if not self._stats:
            return {}
        kept, everything = (sum(v) / len(self._stats) for v in zip(*self._stats))
        self._stats = []
        return {"select/score_kept": kept, "select/score_all": everything}

    def state_dict(self) -> dict[str, Any]:
        return {"val_gen": self._val_gen.get_state(), "row_gen": self._row_gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._val_gen.set_state(state["val_gen"])
        self._row_gen.set_state(state["row_gen"])


def _factory(policy: str):
    def build(config, support_dataset=None, **_) -> DataSelectMethod:
        return DataSelectMethod(
            policy,
            fraction=config.select_fraction,
            val_size=config.greats_val_size,
            val=config.greats_val,
            val_dataset=support_dataset,
            lr=config.greats_lr,
            seed=config.seed,
        )

    return build


for _policy in POLICIES:
    register_method(_policy)(_factory(_policy))

"""GAST (Yao et al., EACL 2026): per-block sample selection by alignment with a support gradient.

The method draws the support batch and arms ``gastune.engine.GastEngine`` around the ordinary
forward + backward; the engine scores, selects and delivers each block's gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from gastune.engine import GastEngine, GastSettings, support_gradients
from gastune.engine.stats import SelectionRecord, selection_mask, summarize
from gastune.engine.support import SUPPORT_ROWS_KEY
from gastune.errors import GastuneError
from gastune.methods.base import TrainingMethod, register_method
from gastune.methods.rows import is_hf_dataset, join_rows


class GastMethod(TrainingMethod):
    """GAST: per-block sample selection by alignment with a support gradient.

    Args:
        settings: k, selection rule, score, τ, granularity.
        support_size: K_sup, support samples per step.
        support: ``train`` (fresh draw from the training set every step), ``heldout``
            (draw from ``support_dataset``) or ``batch`` (the batch's own mean gradient).
        seed: seeds the support draws and the per-layer selection draws.
        keep_masks: how many recent selection masks to keep for the heatmap.
        support_pass: ``one`` (default) — the support rows ride in the batch's
            forward/backward and their per-sample gradients give G_l at each block's gate;
            ``two`` — a separate support forward/backward first. Same selections, update
            and FLOPs; one pass took ×0.96 and ×1.01 the time of two in two step_cost runs,
            but its forward holds N + K_sup rows: ×1.2 the peak memory at 16 × 256
            (docs/results/step_cost_cpu.json). ``one`` falls back to ``two`` when trainable
            parameters lie outside the decoder blocks (the support rows would train them).
    """

    name = "gast"

    def __init__(
        self,
        settings: GastSettings | None = None,
        support_size: int = 4,
        support: str = "train",
        support_dataset=None,
        seed: int = 0,
        keep_masks: int = 256,
        support_pass: str = "one",
    ):
        if support not in ("train", "heldout", "batch"):
            raise GastuneError(f"support must be train, heldout or batch, got '{support}'")
        if support_pass not in ("one", "two"):
            raise GastuneError(f"support_pass must be one or two, got '{support_pass}'")
        if support_size < 1:
            raise GastuneError(f"support_size (K_sup) must be ≥ 1, got {support_size}")
        if support == "heldout" and support_dataset is None:
            raise GastuneError("support='heldout' needs a support dataset (--support_data)")
        if support_dataset is not None and len(support_dataset) == 0:
            raise GastuneError("the support set is empty")
        self.settings = settings or GastSettings()
        self.support_size = support_size
        self.support = support
        self.support_dataset = support_dataset
        self.seed = seed
        self.keep_masks = keep_masks
        self.support_pass = support_pass
        self.engine: GastEngine | None = None
        self.masks: list[tuple[int, torch.Tensor]] = []
        self._records: list[tuple[int, list[SelectionRecord]]] = []
        self._support_gen = torch.Generator()
        self._select_gen = torch.Generator()

    def setup(self, trainer, model) -> None:
        unwrapped = trainer.accelerator.unwrap_model(model)
        self.engine = GastEngine(unwrapped, self.settings).attach()
        rank = trainer.args.process_index
        # Each rank draws its own support samples and selections (see docs/distributed).
        self._support_gen.manual_seed(self.seed * 1000 + 2 * rank + 1)
        self._select_gen.manual_seed(self.seed * 1000 + 2 * rank + 2)
        dataset = self.support_dataset if self.support == "heldout" else trainer.train_dataset
        if self.support != "batch" and (dataset is None or len(dataset) == 0):
            raise GastuneError("the support set is empty: there is nothing to draw support samples from")
        # Do for the support draws what the Trainer does for its dataloader: drop the columns the
        # model does not take (e.g. raw text) before collating.
        self._collator = trainer.data_collator
        if dataset is not None and is_hf_dataset(dataset):
            dataset = trainer._remove_unused_columns(dataset, description="support")
        elif dataset is not None:
            self._collator = trainer._get_collator_with_removed_columns(
                trainer.data_collator, description="support"
            )
        self._support_source = dataset

    def _support_batch(self, trainer) -> dict[str, torch.Tensor]:
        dataset = self._support_source
        size = min(self.support_size, len(dataset))
        picks = torch.randperm(len(dataset), generator=self._support_gen)[:size].tolist()
        return trainer._prepare_inputs(self._collator([dataset[i] for i in picks]))

    def training_step(self, trainer, model, inputs, run):
        assert self.engine is not None, "setup() was not called"
        n = inputs["input_ids"].shape[0]
        support = None
        if self.support != "batch" and self._one_pass():
            return self._one_pass_step(trainer, model, inputs)
        if self.support != "batch":
            batch = self._support_batch(trainer)
            with trainer.compute_loss_context_manager():
                support = support_gradients(
                    trainer.accelerator.unwrap_model(model),
                    batch,
                    self.engine.block_parameters,
                    blocks=self.engine.blocks.blocks,  # FSDP2: the gathered copies
                )
        step_seed = int(torch.randint(0, 2**62, (1,), generator=self._select_gen))
        full = trainer.args.per_device_train_batch_size
        with self.engine.step(n, support=support, step_seed=step_seed, full_batch_size=full):
            loss = run()
        self._keep_records(trainer, n)
        return loss

    def _one_pass(self) -> bool:
        return self.support_pass == "one" and not any(p.requires_grad for _, p in self.engine.outside)

    def _one_pass_step(self, trainer, model, inputs):
        """The support rows appended to the micro-batch: one forward/backward for both."""
        n = inputs["input_ids"].shape[0]
        support_batch = self._support_batch(trainer)
        rows = support_batch["input_ids"].shape[0]
        combined = {**join_rows(inputs, support_batch), SUPPORT_ROWS_KEY: rows}
        step_seed = int(torch.randint(0, 2**62, (1,), generator=self._select_gen))
        full = trainer.args.per_device_train_batch_size
        with self.engine.step(n, step_seed=step_seed, full_batch_size=full, support_rows=rows):
            loss = trainer.plain_training_step(model, combined)
        self._keep_records(trainer, n)
        return loss

    def _keep_records(self, trainer, n: int) -> None:
        self._records.append((n, self.engine.records))
        step = trainer.state.global_step
        if self.keep_masks:
            self.masks.append((step, selection_mask(self.engine.records, n, len(self.engine.groups))))
            del self.masks[: -self.keep_masks]

    def metrics(self) -> dict[str, float]:
        if not self._records or self.engine is None:
            return {}
        sums: dict[str, float] = {}
        for n, records in self._records:
            for key, value in summarize(records, n, len(self.engine.groups)).items():
                sums[key] = sums.get(key, 0.0) + value
        count = len(self._records)
        self._records = []
        return {f"gast/{k}": v / count for k, v in sums.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"support_gen": self._support_gen.get_state(), "select_gen": self._select_gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._support_gen.set_state(state["support_gen"])
        self._select_gen.set_state(state["select_gen"])


@register_method("gast")
def _gast(config, support_dataset=None, **_) -> GastMethod:
    return GastMethod(
        settings=config.gast_settings(),
        support_size=config.gast_support_size,
        support=config.gast_support,
        support_dataset=support_dataset,
        seed=config.seed,
        support_pass=config.gast_support_pass,
    )

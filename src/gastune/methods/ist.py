"""IST — Importance-aware Sparse Tuning (Yao et al., "Layer-wise Importance Matters: Less Memory
for Better Performance in Parameter-efficient Fine-tuning of Large Language Models", Findings of
EMNLP 2024, arXiv 2410.11772).

Reproduces the official code (antgroup/importance-aware-sparse-tuning-IST-paper, ``ist.py``,
a Trainer callback acting at ``on_step_begin``, i.e. once per optimizer step):

- one score s_i per decoder layer, starting at 0; high s means *less* important;
- every 10 optimizer steps (not at step 0), before choosing the layers: take the next batch
  of 16 from a shuffled pass over the training set; in eval mode and without gradients, draw
  3 distinct sets of ``int(0.5·L)`` layers with weights sigmoid(s); for each set scale those
  layers' adapter output by 0.25 ("response suppression", through peft's ``scale_layer``) and
  measure the loss ℓ_k; restore every scaling exactly. Then R_k = exp(−ℓ_k),
  A_k = R_k − mean(R), p = sigmoid(s) taken once, and for every layer i in set k:
  s_i += 10 · A_k · p_i (1 − p_i);
- every optimizer step: draw ``int(0.25·L)`` layers without replacement with weights
  sigmoid(−s) and train only their adapters (freezing as in ``gastune.methods.layerwise``,
  whose docstring also gives the optimizer-state decision: frozen layers keep their Adam
  state untouched, as in the official code).

Differences from the official code, all deliberate:
- the probe loss is the project's loss (mean over samples of each sample's mean token loss,
  the unit every method trains on) instead of the model's token-mean ``outputs.loss``;
- layer counts are at least 1 (the official ``int(0.25·L)`` is 0 for L < 4), and when fewer
  than 3 distinct probe sets exist the probe uses all of them instead of looping forever;
- draws come from a seeded generator (the same on every rank) rather than the global RNG.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from gastune.engine.loss import per_sample_loss
from gastune.errors import GastuneError
from gastune.methods.base import register_method
from gastune.methods.layerwise import LayerFreezer, LayerwiseMethod, layer_generator
from gastune.methods.rows import RowSource, ShuffledBatches
from gastune.selection.layer_policies import (
    ist_active_layers,
    ist_probe_sets,
    ist_score_update,
    layers_for_fraction,
)

PROBE_SEED_OFFSET = 998  # the probe batches' shuffle


def scalable_modules(block: nn.Module) -> list[nn.Module]:
    """Adapter layers inside ``block`` that implement peft's scaling API."""
    return [
        m
        for m in block.modules()
        if callable(getattr(m, "scale_layer", None)) and callable(getattr(m, "unscale_layer", None))
    ]


@contextmanager
def suppressed(modules: list[nn.Module], factor: float) -> Iterator[None]:
    """Scale the output of the adapters in ``modules`` by ``factor`` (peft ``scale_layer``);
    on exit restore every scaling exactly (the saved per-adapter dict where there is one,
    ``unscale_layer`` otherwise)."""
    saved = []
    try:
        for m in modules:
            scaling = getattr(m, "scaling", None)
            saved.append((m, dict(scaling) if isinstance(scaling, dict) else None))
            m.scale_layer(factor)
        yield
    finally:
        for m, snapshot in reversed(saved):
            if snapshot is None:
                m.unscale_layer(factor)
            else:
                m.scaling.update(snapshot)


class IstPolicy:
    """IST's layer choice: importance scores learned by response-suppression probes.

    Args:
        fraction: layers trained per step (official 0.25).
        interval: optimizer steps between probes (official 10).
        probe_batch: rows in a probe batch (official 16).
        probe_sets: suppressed sets per probe (official 3).
        probe_fraction: share of layers suppressed per set (official 0.5).
        suppression: adapter output scale while suppressed (official 0.25).
        score_lr: step size of the score update (official 10).
        seed: seeds the layer draws (identical on every rank) and the probe batches.
    """

    name = "ist"

    def __init__(
        self,
        fraction: float = 0.25,
        interval: int = 10,
        probe_batch: int = 16,
        probe_sets: int = 3,
        probe_fraction: float = 0.5,
        suppression: float = 0.25,
        score_lr: float = 10.0,
        seed: int = 0,
    ):
        for value, label in ((fraction, "fraction"), (probe_fraction, "probe fraction")):
            if not 0 < value <= 1:
                raise GastuneError(f"IST {label} must be in (0, 1], got {value}")
        if min(interval, probe_batch, probe_sets) < 1:
            raise GastuneError("IST interval, probe batch and probe sets must be ≥ 1")
        if not suppression > 0:
            raise GastuneError(f"IST suppression factor must be > 0, got {suppression}")
        self.fraction, self.interval, self.probe_batch = fraction, interval, probe_batch
        self.probe_sets, self.probe_fraction = probe_sets, probe_fraction
        self.suppression, self.score_lr = suppression, score_lr
        self.generator = layer_generator(seed)
        self.batches = ShuffledBatches(
            probe_batch, torch.Generator().manual_seed(seed * 1000 + PROBE_SEED_OFFSET)
        )
        self.scores: torch.Tensor | None = None
        self.probes: list[tuple[int, list[torch.Tensor], list[float]]] = []  # (step, sets, losses)
        self._probe_losses: list[float] = []

    def setup(self, trainer, model: nn.Module, freezer: LayerFreezer) -> None:
        n = freezer.n_layers
        self.k = layers_for_fraction(self.fraction, n)
        self.k_probe = layers_for_fraction(self.probe_fraction, n)
        self.modules = [scalable_modules(block) for block in freezer.blocks.blocks]
        if not any(self.modules):
            raise GastuneError(
                "IST suppresses adapter outputs through peft's scaling API (scale_layer): the model "
                "has no adapter layer with it (LoRA, DoRA, LoHa, LoKr, series and parallel have it; "
                "IA3 and full-parameter training do not)"
            )
        if self.scores is None:
            self.scores = torch.zeros(n, dtype=torch.float64)
        self.rows = RowSource(trainer, trainer.train_dataset, "IST probe")

    def choose(self, trainer, model: nn.Module, step: int) -> torch.Tensor:
        if step > 0 and step % self.interval == 0:
            self.probe(trainer, model, step)
        return ist_active_layers(self.scores, self.k, self.generator)

    def probe(self, trainer, model: nn.Module, step: int) -> None:
        """One response-suppression probe and score update."""
        batch = self.rows.batch(self.batches.next(len(self.rows)))
        sets = ist_probe_sets(self.scores, self.k_probe, self.probe_sets, self.generator)
        losses = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), trainer.compute_loss_context_manager():
                for layer_set in sets:
                    modules = [m for i in layer_set.tolist() for m in self.modules[i]]
                    with suppressed(modules, self.suppression):
                        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
                        losses.append(float(per_sample_loss(out.logits, batch["labels"]).mean()))
        finally:
            model.train(was_training)
        self.scores = ist_score_update(self.scores, sets, losses, self.score_lr)
        self.probes.append((step, sets, losses))
        del self.probes[:-64]
        self._probe_losses.extend(losses)

    def metrics(self) -> dict[str, float]:
        if self.scores is None:
            return {}
        out = {"ist/score_min": float(self.scores.min()), "ist/score_max": float(self.scores.max())}
        if self._probe_losses:
            out["ist/probe_loss"] = sum(self._probe_losses) / len(self._probe_losses)
            self._probe_losses = []
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "scores": self.scores,
            "generator": self.generator.get_state(),
            "batches": self.batches.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores = state["scores"]
        self.generator.set_state(state["generator"])
        self.batches.load_state_dict(state["batches"])


def ist_policy(config) -> IstPolicy:
    return IstPolicy(
        fraction=config.ist_layer_fraction,
        interval=config.ist_interval,
        probe_batch=config.ist_probe_batch,
        probe_sets=config.ist_probe_sets,
        probe_fraction=config.ist_probe_fraction,
        suppression=config.ist_suppression,
        score_lr=config.ist_score_lr,
        seed=config.seed,
    )


@register_method("ist")
def _ist(config, **_) -> LayerwiseMethod:
    return LayerwiseMethod(ist_policy(config))

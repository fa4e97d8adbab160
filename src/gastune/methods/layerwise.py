"""Layer-selective training: only some decoder layers' adapters train in an optimizer step.

The data × layer mask of these methods sets whole columns. Policies:

- ``rst`` — Random Sparse Tuning, IST's ablation (Yao et al., Findings of EMNLP 2024,
  arXiv 2410.11772): a uniform random ``int(0.25·L)`` layers every optimizer step.
- ``lisa`` — Layerwise Importance Sampled AdamW (Pan et al., NeurIPS 2024, arXiv 2403.17919):
  γ (default 2) uniformly drawn layers, re-drawn every K (default 20) optimizer steps.
- ``fisher`` — surgical fine-tuning by Fisher score (Lodha et al., Findings of EMNLP 2023,
  arXiv 2310.17041): the top-k layers by a diagonal-Fisher score on ~100 training examples,
  fixed for the whole run.
- ``ist`` — see ``gastune.methods.ist``.

How freezing works (the failures of the reference implementations avoided):

- Nothing is frozen at construction: every adapter is trainable when the Trainer builds its
  optimizer, so every one is in it. The choice is applied at the first micro-batch of each
  optimizer step (so with gradient accumulation all micro-batches share it) by setting
  ``requires_grad=False`` on the other layers' parameters right before the forward — so
  autograd allocates no gradient for them, saves no activations for their weight
  gradients, and, when no block below layer j trains (and embeddings are frozen), does not
  back-propagate below block j at all. The mask is re-applied every micro-batch, so peft
  re-enabling ``requires_grad`` (adapter enable/disable) cannot leak through.
- After the backward, frozen parameters get ``.grad = None`` and every parameter is made
  trainable again (for the optimizer, peft and checkpointing code that look at it).
- Optimizer state: AdamW skips a parameter whose ``.grad`` is None, so a frozen layer's
  moments and step count are kept as they are — not decayed, not dropped — and neither a
  weight-decay nor a momentum update moves it. It resumes from its own state when drawn
  again. Memory: frozen layers keep their (already allocated) optimizer state.
- Parameters outside the decoder blocks (e.g. an embedding or head saved with peft's
  ``modules_to_save``, or everything outside the blocks in full-parameter training) stay
  trainable every step; LISA can freeze them instead (``lisa_keep_outside=False``).
- Data parallel: the layer draws use a generator seeded identically on every rank, so all
  ranks freeze the same layers (DDP needs ``ddp_find_unused_parameters``, the Trainer's
  default for peft models).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch

from gastune.engine.live import full_shape, parameters_in_use
from gastune.engine.loss import per_sample_loss
from gastune.errors import GastuneError
from gastune.methods.base import TrainingMethod, register_method
from gastune.methods.rows import RowSource
from gastune.models.blocks import find_decoder_blocks, trainable_by_block
from gastune.selection.layer_policies import (
    column_mask,
    count_or_fraction,
    fisher_layer_scores,
    layers_for_fraction,
    top_layers,
    uniform_layers,
)

logger = logging.getLogger(__name__)

# Layer draws must agree across ranks: their seed depends on the run seed only.
LAYER_SEED_OFFSET = 999
FISHER_SEED_OFFSET = 997  # which training examples Fisher scores on


def layer_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + LAYER_SEED_OFFSET)


class LayerFreezer:
    """Groups the trainable parameters by decoder block and freezes all but some blocks.

    Build it while every adapter is trainable (in ``setup``, never in a constructor).
    """

    def __init__(self, model: torch.nn.Module):
        self.blocks = find_decoder_blocks(model)
        per_block, outside = trainable_by_block(model, self.blocks)
        self.per_block = [[p for _, p in named] for named in per_block]
        self.outside = [p for _, p in outside]
        if not any(self.per_block):
            raise GastuneError(
                "no trainable parameters inside the decoder blocks: a layer-selective method "
                "chooses decoder blocks to train, so the adapter must add trainable tensors to them"
            )

    @property
    def n_layers(self) -> int:
        return len(self.per_block)

    def freeze(self, active: set[int], train_outside: bool = True) -> None:
        """Only blocks in ``active`` (and, if ``train_outside``, parameters outside blocks) train."""
        for layer, params in enumerate(self.per_block):
            for p in params:
                p.requires_grad_(layer in active)
        for p in self.outside:
            p.requires_grad_(train_outside)

    def release(self, active: set[int], train_outside: bool = True) -> None:
        """After the backward: frozen parameters get ``.grad = None``; all are trainable again."""
        for layer, params in enumerate(self.per_block):
            for p in params:
                if layer not in active:
                    p.grad = None
                p.requires_grad_(True)
        for p in self.outside:
            if not train_outside:
                p.grad = None
            p.requires_grad_(True)


class LayerPolicy(Protocol):
    """Chooses the layers trained in an optimizer step."""

    name: str

    def setup(self, trainer, model: torch.nn.Module, freezer: LayerFreezer) -> None: ...

    def choose(self, trainer, model: torch.nn.Module, step: int) -> torch.Tensor:
        """Sorted int64 indices of the layers trained in optimizer step ``step``."""
        ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LayerwiseMethod(TrainingMethod):
    """Train only the layers a ``policy`` chooses, per optimizer step.

    Args:
        policy: the layer choice (IST, RST, LISA, Fisher).
        inner: the method run on the active layers (default: dense, every sample; GAST for
            ``gast+ist``). It is set up before anything is frozen.
        train_outside: keep trainable parameters outside the decoder blocks training.
        keep_masks / keep_history: how many recent masks / layer choices to keep.
    """

    def __init__(
        self,
        policy: LayerPolicy,
        name: str | None = None,
        inner: TrainingMethod | None = None,
        train_outside: bool = True,
        keep_masks: int = 256,
        keep_history: int = 10_000,
    ):
        self.policy = policy
        self.name = name or policy.name
        self.inner = inner or TrainingMethod()
        self.train_outside = train_outside
        self.keep_masks, self.keep_history = keep_masks, keep_history
        self.freezer: LayerFreezer | None = None
        self.active: torch.Tensor | None = None
        self._step: int | None = None
        self.history: list[tuple[int, tuple[int, ...]]] = []  # (optimizer step, active layers)
        self.masks: list[tuple[int, torch.Tensor]] = []
        self._counts: list[tuple[int, int]] = []

    def setup(self, trainer, model) -> None:
        self.inner.setup(trainer, model)
        unwrapped = trainer.accelerator.unwrap_model(model)
        self.freezer = LayerFreezer(unwrapped)
        self.policy.setup(trainer, unwrapped, self.freezer)

    def training_step(self, trainer, model, inputs, run):
        assert self.freezer is not None, "setup() was not called"
        step = trainer.state.global_step
        if self.active is None or step != self._step:  # first micro-batch of an optimizer step
            self.active = self.policy.choose(trainer, trainer.accelerator.unwrap_model(model), step)
            self._step = step
            self.history.append((step, tuple(self.active.tolist())))
            del self.history[: -self.keep_history]
        active = set(self.active.tolist())
        self.freezer.freeze(active, self.train_outside)
        try:
            loss = self.inner.training_step(trainer, model, inputs, run)
        finally:
            self.freezer.release(active, self.train_outside)
        n = inputs["input_ids"].shape[0]
        mask = column_mask(n, self.freezer.n_layers, self.active)
        inner_masks = getattr(self.inner, "masks", None)
        if inner_masks:  # gast+ist: GAST's per-layer sample choice inside the active columns
            mask = mask & inner_masks[-1][1]
        if self.keep_masks:
            self.masks.append((step, mask))
            del self.masks[: -self.keep_masks]
        self._counts.append((len(active), min(active)))
        return loss

    def metrics(self) -> dict[str, float]:
        out = {**self.inner.metrics(), **self.policy.metrics()}
        if self._counts:
            out["layers/active"] = sum(c for c, _ in self._counts) / len(self._counts)
            out["layers/lowest_active"] = sum(low for _, low in self._counts) / len(self._counts)
            self._counts = []
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.state_dict(),
            "inner": self.inner.state_dict(),
            "active": None if self.active is None else self.active.clone(),
            "step": self._step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.inner.load_state_dict(state["inner"])
        self.active, self._step = state["active"], state["step"]


class RandomLayers:
    """``count`` (or ``fraction`` of the) layers drawn uniformly every ``interval`` steps (RST, LISA)."""

    def __init__(
        self,
        name: str,
        count: int | None = None,
        fraction: float | None = None,
        interval: int = 1,
        seed: int = 0,
    ):
        if (count is None) == (fraction is None):
            raise GastuneError("give a layer count or a layer fraction, not both")
        if interval < 1:
            raise GastuneError(f"the re-draw interval must be ≥ 1 step, got {interval}")
        self.name, self.count, self.fraction, self.interval = name, count, fraction, interval
        self.generator = layer_generator(seed)
        self.current: torch.Tensor | None = None
        self.draws = 0

    def setup(self, trainer, model, freezer: LayerFreezer) -> None:
        n = freezer.n_layers
        if self.count is not None and not 1 <= self.count <= n:
            raise GastuneError(f"{self.name}: cannot train {self.count} of the model's {n} layers")
        self.k = self.count if self.count is not None else layers_for_fraction(self.fraction, n)
        self.n_layers = n

    def choose(self, trainer, model, step: int) -> torch.Tensor:
        if self.current is None or step % self.interval == 0:
            self.current = uniform_layers(self.n_layers, self.k, self.generator)
            self.draws += 1
        return self.current

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "current": self.current, "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.current, self.draws = state["current"], state["draws"]


def diagonal_fisher(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    per_block: list[list[torch.nn.Parameter]],
    context: Callable[[], AbstractContextManager] = nullcontext,
    blocks: list[torch.nn.Module] | None = None,
) -> list[list[torch.Tensor]]:
    """Empirical diagonal Fisher of every block tensor: the mean over single-example batches
    (eval mode) of the squared gradient of the example's loss (its mean token loss).

    ``blocks`` (the decoder blocks of ``per_block``) makes it work under FSDP2: gradients are
    then taken with respect to the gathered copies each block's forward used.

    Returns:
        ``fisher[l][j]``: fp32 tensor shaped like the (whole) parameter ``per_block[l][j]``.
    """
    params = [p for block in per_block for p in block]
    fisher: list[torch.Tensor] | None = None
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            with context(), parameters_in_use(blocks or [], per_block) as in_use:
                out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
                loss = per_sample_loss(out.logits, batch["labels"]).mean()
            used = [in_use.get(id(p), p) for p in params]
            if fisher is None:
                fisher = [torch.zeros(full_shape(u), dtype=torch.float32, device=u.device) for u in used]
            for f, g in zip(fisher, torch.autograd.grad(loss, used, allow_unused=True)):
                if g is not None:
                    f.add_(g.float().square())
            count += 1
    finally:
        model.train(was_training)
    if fisher is None:  # no example
        fisher = [torch.zeros(full_shape(p), dtype=torch.float32, device=p.device) for p in params]
    it = iter(f.div_(max(count, 1)) for f in fisher)
    return [[next(it) for _ in block] for block in per_block]


class FisherLayers:
    """The top-k layers by diagonal-Fisher score, computed once at the first training step
    (before anything is frozen), fixed afterwards."""

    name = "fisher"

    def __init__(self, layers: float = 0.25, samples: int = 100, seed: int = 0):
        if samples < 1:
            raise GastuneError(f"fisher needs ≥ 1 example, got {samples}")
        self.layers, self.samples, self.seed = layers, samples, seed
        self.scores: torch.Tensor | None = None
        self.chosen: torch.Tensor | None = None
        self.indices: list[int] = []

    def setup(self, trainer, model, freezer: LayerFreezer) -> None:
        try:
            self.k = count_or_fraction(self.layers, freezer.n_layers)
        except ValueError as exc:
            raise GastuneError(f"fisher_layers: {exc}") from None
        self.freezer = freezer
        self.rows = RowSource(trainer, trainer.train_dataset, "Fisher")

    def choose(self, trainer, model, step: int) -> torch.Tensor:
        # Scored at the first training step (before anything is frozen), unless a resumed
        # checkpoint already brought the choice along.
        if self.chosen is None:
            generator = torch.Generator().manual_seed(self.seed * 1000 + FISHER_SEED_OFFSET)
            self.indices = torch.randperm(len(self.rows), generator=generator)[: self.samples].tolist()
            batches = (self.rows.batch([i]) for i in self.indices)
            context = trainer.compute_loss_context_manager
            blocks = self.freezer.blocks.blocks
            fisher = diagonal_fisher(model, batches, self.freezer.per_block, context, blocks)
            self.scores = fisher_layer_scores(fisher)
            self.chosen = top_layers(self.scores, self.k)
            logger.info(
                "fisher: training layers %s of %d (scores %s)",
                self.chosen.tolist(),
                self.freezer.n_layers,
                self.scores.tolist(),
            )
        return self.chosen

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "chosen": self.chosen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores, self.chosen = state["scores"], state["chosen"]


@register_method("rst")
def _rst(config, **_) -> LayerwiseMethod:
    return LayerwiseMethod(RandomLayers("rst", fraction=config.rst_layer_fraction, seed=config.seed))


@register_method("lisa")
def _lisa(config, **_) -> LayerwiseMethod:
    policy = RandomLayers("lisa", count=config.lisa_layers, interval=config.lisa_interval, seed=config.seed)
    return LayerwiseMethod(policy, train_outside=config.lisa_keep_outside)


@register_method("fisher")
def _fisher(config, **_) -> LayerwiseMethod:
    return LayerwiseMethod(FisherLayers(config.fisher_layers, config.fisher_samples, config.seed))

"""GastEngine: per-layer sample selection inside one back-propagation.

Usage (what ``GastuneTrainer`` does every step)::

    engine = GastEngine(peft_model, GastSettings(k=8)).attach()
    support = support_gradients(peft_model, support_batch, engine.block_parameters)
    with engine.step(batch_size=16, support=support, step_seed=seed):
        loss = per_sample_loss(peft_model(**batch).logits, batch["labels"]).mean()
        loss.backward()      # .grad of block adapters = mean gradient of their selected samples
    optimizer.step()

The loss must be the *mean over samples* of per-sample losses (times any constant, e.g.
1/gradient-accumulation): the engine rescales each block's selected sum accordingly.
Trainable parameters outside decoder blocks get the plain batch mean.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from gastune.engine.capture import BlockCapture, GenericCall
from gastune.engine.gate import BlockGate
from gastune.engine.generic import call_unit_of, detached_call, replay_per_sample
from gastune.engine.live import gather_with_blocks, live_parameters, names_in_block, release_from_blocks
from gastune.engine.persample_linear import per_sample_linear_forward
from gastune.engine.settings import GastSettings
from gastune.engine.stats import SelectionRecord
from gastune.engine.support import support_sum
from gastune.errors import GastuneError
from gastune.models.blocks import BlockList, find_decoder_blocks, trainable_by_block
from gastune.selection.sampling import (
    alignment_scores,
    batch_support,
    choose_samples,
    layer_generator,
    mask_ineligible,
    support_is_usable,
)

logger = logging.getLogger(__name__)


@dataclass
class Group:
    """The unit of selection: all adapter tensors of one block (or of one module in it)."""

    index: int
    block: int
    name: str
    params: list[nn.Parameter] = field(default_factory=list)
    # where each of ``params`` sits in its block's parameter list (the gate's live copies)
    positions: list[int] = field(default_factory=list)


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _tuner_layer_name(model: nn.Module, param_name: str) -> str:
    """The adapted module a parameter belongs to (e.g. ``...layers.3.self_attn.q_proj``)."""
    parts = param_name.split(".")[:-1]
    while parts:
        if hasattr(model.get_submodule(".".join(parts)), "base_layer"):  # peft BaseTunerLayer
            return ".".join(parts)
        parts.pop()
    return call_unit_of(model, param_name)


class GastEngine:
    """Attach to a model (typically a peft model) to train with GAST selection."""

    def __init__(self, model: nn.Module, settings: GastSettings | None = None):
        self.model = model
        self.settings = settings or GastSettings()
        self.blocks: BlockList = find_decoder_blocks(model)
        per_block, self.outside = trainable_by_block(model, self.blocks)
        if not any(per_block):
            raise GastuneError(
                "no trainable adapter parameters inside the decoder blocks: GAST selects samples per "
                "decoder block, so the adapter must add trainable tensors to the blocks"
            )
        self.block_parameters: list[list[nn.Parameter]] = [[p for _, p in named] for named in per_block]
        # Under FSDP2 a block runs on gathered copies of its parameters: the gate looks them up
        # by name when the block runs (gastune.engine.live).
        self._names = [names_in_block(b, ps) for b, ps in zip(self.blocks.blocks, self.block_parameters)]
        self._live: dict[int, list[torch.Tensor]] = {}
        self.groups: list[Group] = []
        self._linear: list[tuple[int, nn.Linear]] = []
        self._generic: dict[str, tuple[int, dict[str, nn.Parameter]]] = {}
        self._classify(per_block)
        self._groups_by_block: dict[int, list[Group]] = {}
        for g in self.groups:
            self._groups_by_block.setdefault(g.block, []).append(g)
        self._handles: list = []
        self._external: list = []  # DeepSpeed ZeRO-3 registrations (gastune.engine.live)
        self._patched: list[tuple[nn.Module, object]] = []
        self._captures: dict[int, BlockCapture] = {}
        self._support: dict[int, torch.Tensor] | None = None
        self._support_rows = 0
        self._step_seed = 0
        self._armed = False
        self._k = 1
        self._on_block: Callable[[int, list[torch.Tensor]], None] | None = None
        self.records: list[SelectionRecord] = []
        self._eligible: torch.Tensor | None = None
        # groups, over all steps, whose support gradient was zero or non-finite (see step())
        self.support_fallbacks = 0

    # ------------------------------------------------------------------ set-up
    def _classify(self, per_block: list[list[tuple[str, nn.Parameter]]]) -> None:
        seen_linear: set[int] = set()
        groups: dict[tuple[int, str], Group] = {}
        for block, named in enumerate(per_block):
            for position, (name, param) in enumerate(named):
                owner_name, leaf = name.rsplit(".", 1)
                owner = self.model.get_submodule(owner_name)
                if _is_plain_linear(owner) and leaf in ("weight", "bias"):
                    if id(owner) not in seen_linear:
                        seen_linear.add(id(owner))
                        self._linear.append((block, owner))
                else:
                    unit = call_unit_of(self.model, name)
                    _, unit_params = self._generic.setdefault(unit, (block, {}))
                    unit_params[name[len(unit) + 1 :] if unit else name] = param
                key = (
                    block,
                    "" if self.settings.granularity == "block" else _tuner_layer_name(self.model, name),
                )
                if key not in groups:
                    label = f"{self.blocks.prefix}.{block}" + (f":{key[1]}" if key[1] else "")
                    groups[key] = Group(index=len(groups), block=block, name=label)
                groups[key].params.append(param)
                groups[key].positions.append(position)
        self.groups = list(groups.values())

    def attach(self) -> GastEngine:
        """Patch adapter modules and gate every decoder block. Returns ``self``."""
        if self._patched:
            return self
        for block, module in self._linear:
            self._patch(module, self._linear_forward(block, module))
        for unit_name, (block, params) in self._generic.items():
            module = self.model.get_submodule(unit_name)
            self._patch(module, self._generic_forward(block, module, params))
        # ZeRO-3: the gate uses the block's adapter parameters outside their own modules
        self._external = gather_with_blocks(self.blocks.blocks, self.block_parameters)
        for index, block in enumerate(self.blocks.blocks):
            if self.block_parameters[index]:
                self._handles.append(
                    block.register_forward_pre_hook(self._gate_hook(index), with_kwargs=True)
                )
        logger.info(
            "GAST engine attached: %d blocks, %d selection groups, %d linear and %d generic adapter modules",
            len(self.blocks),
            len(self.groups),
            len(self._linear),
            len(self._generic),
        )
        return self

    def detach(self) -> None:
        """Undo ``attach``: the model behaves exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        release_from_blocks(self._external)
        self._external = []
        for module, previous in reversed(self._patched):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._patched.clear()

    def _patch(self, module: nn.Module, forward) -> None:
        self._patched.append((module, module.__dict__.get("forward")))
        module.forward = forward

    def _linear_forward(self, block: int, module: nn.Linear):
        original = module.forward

        def forward(x, *args, **kwargs):
            capture = self._captures.get(block) if self._armed else None
            if capture is None or not torch.is_grad_enabled():
                return original(x, *args, **kwargs)
            return per_sample_linear_forward(module, x, capture)

        return forward

    def _generic_forward(self, block: int, module: nn.Module, params: dict[str, nn.Parameter]):
        original = module.forward

        def forward(*args, **kwargs):
            capture = self._captures.get(block) if self._armed else None
            if capture is None or not torch.is_grad_enabled():
                return original(*args, **kwargs)
            live = dict(zip(params, live_parameters(module, list(params))))  # FSDP2: gathered copies
            out = detached_call(module, original, live, args, kwargs)
            if isinstance(out, torch.Tensor) and out.requires_grad:
                call = GenericCall(forward=original, args=args, kwargs=kwargs, params=live)
                capture.generic_calls.append(call)
                out.register_hook(call.set_grad)
            return out

        return forward

    def _gate_hook(self, index: int):
        def hook(module, args, kwargs):
            if not self._armed or not torch.is_grad_enabled() or index not in self._captures:
                return None
            params = live_parameters(module, self._names[index])  # FSDP2 has just gathered them
            self._live[index] = params
            if args:
                hidden = BlockGate.apply(self._finish_block, index, args[0], *params)
                return (hidden, *args[1:]), kwargs
            hidden = BlockGate.apply(self._finish_block, index, kwargs["hidden_states"], *params)
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    # ------------------------------------------------------------------ one step
    @contextmanager
    def step(
        self,
        batch_size: int,
        support: dict[int, torch.Tensor] | None = None,
        step_seed: int = 0,
        full_batch_size: int | None = None,
        on_block: Callable[[int, list[torch.Tensor]], None] | None = None,
        eligible: torch.Tensor | None = None,
        support_rows: int = 0,
    ) -> Iterator[None]:
        """Arm the engine for one forward + backward over a micro-batch of ``batch_size``.

        Only blocks with at least one parameter that requires grad are armed: a block whose
        adapters a layer-selective method froze for this step runs its ordinary forward.

        Args:
            support: support gradient per block parameter, keyed by ``id(param)``; ``None``
                uses the batch itself (the mean of its per-sample gradients).
            step_seed: seeds every group's draw (each group derives its own generator).
            full_batch_size: the configured micro-batch size, when ``batch_size`` may be a
                shorter last batch (a count k then keeps the same fraction).
            on_block: score-only mode: no selection and no gradient is delivered; instead
                ``on_block(block, per_sample)`` receives each armed block's per-sample
                gradients of the loss, ``(N, *param.shape)`` per block parameter (fp32).
                Back-propagate with ``torch.autograd.grad`` so that ``.grad`` stays untouched.
            eligible: ``(N,)`` bool, the samples that may be selected. Pass
                ``has_target_tokens(batch["labels"])``: a sample with no target token has loss
                0 and must not take a slot. Whatever is passed, a sample whose gradient is
                exactly zero in every tensor of a group is never selected for that group, and
                fewer than k eligible samples means all of them are kept.

        A group whose ``support`` gradient is zero or non-finite (e.g. every support sample had
        a non-finite loss) ranks its samples by the batch's own mean gradient instead: the
        fallback is counted in ``support_fallbacks``, flagged in the step's ``records`` and
        logged as a warning, never a silent uniform draw.
            support_rows: one-pass support (``support`` must be ``None``): the forward runs
                ``batch_size + support_rows`` rows, the support rows last; at each gate the
                sum of their per-sample gradients is the support gradient (scaled by the
                loss's weight on them: use the mean over support rows, ``support.py``'s
                ``one_pass_loss``), the training rows are selected against it, and only
                training rows enter the update.
        """
        if not self._patched:
            raise RuntimeError("GastEngine.step() before attach()")
        self._k = self.settings.k_for(batch_size, full_batch_size)  # validates k
        if support_rows and support is not None:
            raise ValueError("one-pass support rows and a precomputed support gradient are exclusive")
        self._support_rows = support_rows
        self._captures = {
            i: BlockCapture(batch_size + support_rows)
            for i, params in enumerate(self.block_parameters)
            if any(p.requires_grad for p in params)
        }
        if eligible is not None and tuple(eligible.shape) != (batch_size,):
            raise GastuneError(f"eligible must have shape ({batch_size},), got {tuple(eligible.shape)}")
        self._support, self._step_seed, self._armed = support, step_seed, True
        self._live = {}
        self._on_block, self._eligible = on_block, eligible
        self.records = []
        fallbacks_before = self.support_fallbacks
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            self._armed = False
            pending = [i for i, c in self._captures.items() if c.grads or c.generic_calls]
            self._captures, self._support, self._on_block, self._live = {}, None, None, {}
            self._eligible = None
            if self.support_fallbacks > fallbacks_before:
                logger.warning(
                    "GAST: %d of %d selection groups had a zero or non-finite support gradient and "
                    "ranked samples by the batch's own mean gradient instead (%d such groups so far)",
                    self.support_fallbacks - fallbacks_before,
                    len(self.records),
                    self.support_fallbacks,
                )
            if pending and not failed:
                raise RuntimeError(
                    f"gastune: blocks {pending} captured gradients that never reached their gate; "
                    "was backward() run inside engine.step()?"
                )

    def _finish_block(self, index: int) -> list[torch.Tensor]:
        """Called by block ``index``'s gate: select samples, return the selected gradients."""
        capture = self._captures.pop(index, None)
        # the tensors the block's forward used (its parameters, or FSDP2's gathered copies)
        params = self._live.get(index) or self.block_parameters[index]
        if capture is None:  # e.g. a second backward through the same graph
            return [torch.zeros_like(p) for p in params]
        for call in capture.generic_calls:
            replay_per_sample(call, capture)
        if self._on_block is not None:
            self._on_block(index, [capture.get(p) for p in params])
            return [None] * len(params)
        n, k = capture.batch_size - self._support_rows, self._k
        result: dict[int, torch.Tensor] = {}
        for group in self._groups_by_block[index]:
            live = [params[j] for j in group.positions]
            per_sample = [capture.get(p) for p in live]
            fallback = False
            if self._support_rows:  # one pass: the support rows' gradients, after the batch's
                support = [support_sum(g[n:]) for g in per_sample]
                per_sample = [g[:n] for g in per_sample]
                if not support_is_usable(support):
                    support, fallback = batch_support(per_sample), True
            elif self._support is None:  # the batch's own direction; a NaN sample must not spoil it
                support = batch_support(per_sample)
            else:
                # keyed by the attached parameters; a frozen parameter of a partly frozen block
                # has no support gradient
                support = [
                    self._support[id(p)] if id(p) in self._support else torch.zeros_like(q)
                    for p, q in zip(group.params, live)
                ]
                if not support_is_usable(support):  # would score every sample 0 (or NaN)
                    support, fallback = batch_support(per_sample), True
            scores = alignment_scores(per_sample, support, self.settings.score)
            # The one host sync per group and step: the draw runs on the CPU with a CPU
            # generator, so a device gives the same choice as the CPU and the reference.
            scores = mask_ineligible(scores, per_sample, self._eligible).cpu()
            chosen = choose_samples(
                scores,
                k,
                self.settings.selection,
                self.settings.temperature,
                layer_generator(self._step_seed, group.index),
            )
            # Per-sample gradients carry the loss's 1/N; N/|chosen| turns their sum into the mean.
            scale = n / max(len(chosen), 1)
            for p, g in zip(live, per_sample):
                picked = (
                    g.index_select(0, chosen.to(g.device)).sum(dim=0)
                    if len(chosen)
                    else torch.zeros_like(g[0])
                )
                result[id(p)] = (picked * scale).to(p.dtype)
            self.records.append(SelectionRecord.from_scores(group.index, scores, chosen, fallback))
            self.support_fallbacks += int(fallback)
        del capture
        return [result[id(p)] for p in params]

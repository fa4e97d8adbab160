"""Layer-selective baselines (IST, RST, LISA, Fisher, GAST+IST) through GastuneTrainer.

Runs are plain SGD at a constant lr without clipping, so a step moves each parameter by
exactly −lr × its gradient: unselected layers must come out bit-identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainerCallback

from gastune.engine import GastEngine, per_sample_loss
from gastune.engine.reference import reference_gast_gradients
from gastune.errors import GastuneError
from gastune.methods.ist import scalable_modules, suppressed
from gastune.methods.layerwise import LayerFreezer, layer_generator
from gastune.models import find_decoder_blocks
from gastune.selection.layer_policies import fisher_layer_scores, ist_score_update, uniform_layers
from tests.unit._baseline_helpers import (
    LR,
    Collator,
    config,
    dataset,
    layer_of,
    lora_model,
    loss_grads,
    trainable,
    trainer_for,
)

LAYERS = 4
EXPECTED_ACTIVE = {"rst": 1, "ist": 1, "lisa": 2, "fisher": 2, "gast+ist": 1}
OPTIONS = dict(lisa_layers=2, fisher_layers=2, fisher_samples=4, gast_k=2, gast_support_size=2)


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------- one step: only active layers move
@pytest.mark.parametrize("method", ["rst", "ist", "lisa", "fisher", "gast+ist"])
def test_only_the_active_layers_change_and_masks_are_whole_columns(method):
    model = lora_model(LAYERS)
    before = copy.deepcopy(model)
    collator = Collator()
    trainer = trainer_for(method, model=model, collator=collator, **OPTIONS)
    trainer.train()
    (step, active), *_ = trainer.method.history
    assert step == 0 and len(active) == EXPECTED_ACTIVE[method]
    after = trainable(model)
    assert len(after) == len(trainable(before))  # every adapter is trainable again afterwards
    for name, value in after.items():
        old = before.get_parameter(name).detach()
        if layer_of(name) in active:
            assert not torch.equal(value, old), f"{name} (active) did not move"
        else:
            assert torch.equal(value, old), f"{name} (frozen) moved"
    if method != "gast+ist":  # dense on the active layers: the plain mean gradient
        grads = loss_grads(before, collator.batches[0])
        for name, value in after.items():
            if layer_of(name) in active:
                torch.testing.assert_close(value, before.get_parameter(name) - LR * grads[name])
    (_, mask), *_ = trainer.method.masks
    assert mask.shape == (4, LAYERS)
    per_column = mask.sum(dim=0).tolist()
    for layer in range(LAYERS):
        expected = (2 if method == "gast+ist" else 4) if layer in active else 0
        assert per_column[layer] == expected


@pytest.mark.parametrize("support_pass", ["two", "one"])
def test_gast_ist_equals_the_gast_reference_on_the_active_layer(monkeypatch, support_pass):
    model = lora_model(LAYERS)
    before = copy.deepcopy(model)
    collator = Collator()
    trainer = trainer_for(
        "gast+ist", model=model, collator=collator, gast_support_pass=support_pass, **OPTIONS
    )
    seen = {}
    gast = trainer.method.inner
    support_batch = gast._support_batch

    def record_support(trainer_):
        seen["support"] = support_batch(trainer_)
        return seen["support"]

    engine_step = GastEngine.step

    def record_step(self, batch_size, support=None, step_seed=0, **kwargs):
        seen["seed"] = step_seed
        seen["armed_support"] = support
        seen["support_rows"] = kwargs.get("support_rows", 0)
        return engine_step(self, batch_size, support, step_seed, **kwargs)

    monkeypatch.setattr(gast, "_support_batch", record_support)
    monkeypatch.setattr(GastEngine, "step", record_step)
    trainer.train()
    (_, active), *_ = trainer.method.history
    if support_pass == "two":  # the support gradient covered the active layer's adapters only
        support_names = {n for n, p in model.named_parameters() if id(p) in seen["armed_support"]}
        assert support_names and {layer_of(n) for n in support_names} == set(active)
    else:  # the support rows rode in the batch's pass
        assert seen["armed_support"] is None and seen["support_rows"] == 2
    ref = reference_gast_gradients(
        before, collator.batches[0], trainer.args.gast_settings(), seen["support"], seen["seed"]
    )
    names = {id(p): n for n, p in before.named_parameters()}
    after = trainable(model)
    for key, grad in ref.items():
        name = names[key]
        if layer_of(name) in active:
            torch.testing.assert_close(
                after[name], before.get_parameter(name) - LR * grad, rtol=1e-5, atol=1e-6
            )
        else:
            assert torch.equal(after[name], before.get_parameter(name))
    assert {r.group for r in gast.engine.records} == set(active)  # only active blocks selected


# ---------------------------------------------------------------- accumulation, seeds, LISA interval
def test_choice_is_per_optimizer_step_under_gradient_accumulation():
    trainer = trainer_for("rst", max_steps=3, gradient_accumulation_steps=2)
    trainer.train()
    history = trainer.method.history
    assert [s for s, _ in history] == [0, 1, 2]
    masks = trainer.method.masks
    assert [s for s, _ in masks] == [0, 0, 1, 1, 2, 2]
    for i, (_, active) in enumerate(history):
        for _, mask in masks[2 * i : 2 * i + 2]:
            assert mask.any(dim=0).nonzero().flatten().tolist() == list(active)


@pytest.mark.parametrize("method", ["rst", "ist"])
def test_same_seed_gives_the_same_selections(method):
    def run(seed):
        trainer = trainer_for(method, max_steps=4, seed=seed, ist_interval=2, ist_probe_batch=4)
        trainer.train()
        scores = getattr(trainer.method.policy, "scores", None)
        return trainer.method.history, scores

    first, second, other = run(0), run(0), run(1)
    assert first[0] == second[0]
    assert first[0] != other[0]
    if method == "ist":
        assert torch.equal(first[1], second[1]) and first[1].abs().sum() > 0


def test_lisa_redraws_exactly_every_k_steps():
    trainer = trainer_for("lisa", max_steps=7, lisa_layers=1, lisa_interval=3)
    trainer.train()
    g = layer_generator(0)
    draws = [tuple(uniform_layers(LAYERS, 1, g).tolist()) for _ in range(3)]  # steps 0, 3, 6
    expected = [draws[0]] * 3 + [draws[1]] * 3 + [draws[2]]
    assert [active for _, active in trainer.method.history] == expected
    assert trainer.method.policy.draws == 3


# ---------------------------------------------------------------- optimizer state and gradients
class OptimizerProbe(TrainerCallback):
    """Records, per optimizer step, which parameters had a gradient and the AdamW state after."""

    def __init__(self, model):
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.with_grad: list[set[str]] = []
        self.without_grad: list[set[str]] = []
        self.states: list[dict[str, dict]] = []
        self.values: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.with_grad.append({self.names[id(p)] for p in params if p.grad is not None})
        self.without_grad.append({self.names[id(p)] for p in params if p.grad is None})

    def on_step_end(self, args, state, control, optimizer=None, model=None, **kwargs):
        self.states.append(
            {self.names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items() if s}
        )
        self.values.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n})


def test_frozen_layers_get_grad_none_and_keep_their_adamw_state():
    model = lora_model(LAYERS)
    probe = OptimizerProbe(model)
    trainer = trainer_for(
        "rst", model=model, callbacks=[probe], max_steps=4, optim="adamw_torch", weight_decay=0.1
    )
    trainer.train()
    all_lora = {n for n, p in model.named_parameters() if p.requires_grad}
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {probe.names[id(p)] for p in params} == all_lora  # every adapter is in the optimizer
    history = [set(active) for _, active in trainer.method.history]
    assert len({frozenset(a) for a in history}) > 1, "draws never changed; pick another seed"
    for step, active in enumerate(history):
        assert probe.with_grad[step] == {n for n in all_lora if layer_of(n) in active}
        assert probe.without_grad[step] == {n for n in all_lora if layer_of(n) not in active}
        if step == 0:
            continue
        for name in all_lora:
            if layer_of(name) in active:
                continue
            # frozen: value, moments and step count exactly as after the previous step
            assert torch.equal(probe.values[step][name], probe.values[step - 1][name])
            prev, now = probe.states[step - 1].get(name), probe.states[step].get(name)
            assert (prev is None) == (now is None)
            if prev is not None:
                assert all(torch.equal(prev[k], now[k]) for k in prev)


# ---------------------------------------------------------------- back-propagation stops early
def test_backpropagation_stops_below_the_lowest_trainable_layer():
    model = lora_model(LAYERS)
    model.train()
    freezer = LayerFreezer(model)
    blocks = find_decoder_blocks(model).blocks
    embeddings = model.get_input_embeddings()
    seen: dict[str, bool] = {}
    fired: list[str] = []

    def watch(label):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            seen[label] = out.requires_grad
            if out.requires_grad:
                out.register_hook(lambda g: fired.append(label))

        return hook

    handles = [embeddings.register_forward_hook(watch("embeddings"))]
    handles += [b.register_forward_hook(watch(f"block{i}")) for i, b in enumerate(blocks)]
    batch = dataset(4)
    ids = torch.stack([r["input_ids"] for r in batch])
    labels = torch.stack([r["labels"] for r in batch])
    freezer.freeze({2})
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    per_sample_loss(out.logits, labels).mean().backward()
    freezer.release({2})
    for h in handles:
        h.remove()
    assert seen == {"embeddings": False, "block0": False, "block1": False, "block2": True, "block3": True}
    assert set(fired) == {"block2", "block3"}
    grads = {layer_of(n) for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {2} and all(p.requires_grad for n, p in model.named_parameters() if "lora" in n)


def test_backpropagation_stops_early_inside_the_trainer(monkeypatch):
    trainer = trainer_for("rst", max_steps=4)
    blocks = find_decoder_blocks(trainer.model).blocks
    per_run: list[list[bool]] = []
    method = trainer.method
    inner_step = method.inner.training_step

    def recording(trainer_, model, inputs, run):
        flags = [False] * len(blocks)

        def hook_for(i):
            def hook(module, args, output):
                flags[i] = output[0].requires_grad if isinstance(output, tuple) else output.requires_grad

            return hook

        handles = [b.register_forward_hook(hook_for(i)) for i, b in enumerate(blocks)]
        try:
            return inner_step(trainer_, model, inputs, run)
        finally:
            per_run.append(flags)
            for h in handles:
                h.remove()

    monkeypatch.setattr(method.inner, "training_step", recording)
    trainer.train()
    for (_, active), flags in zip(method.history, per_run):
        lowest = min(active)
        assert flags == [i >= lowest for i in range(len(blocks))]


# ---------------------------------------------------------------- IST probe and Fisher scores
def test_suppression_scales_adapter_output_and_restores_scalings_exactly():
    model = lora_model(LAYERS)
    model.eval()
    blocks = find_decoder_blocks(model).blocks
    modules = [m for i in (1, 3) for m in scalable_modules(blocks[i])]
    before = [dict(m.scaling) for m in modules]
    ids = torch.stack([r["input_ids"] for r in dataset(3)])
    # the same output with lora_B of layers 1 and 3 scaled by the factor instead
    reference = copy.deepcopy(model)
    for name, p in reference.named_parameters():
        if "lora_B" in name and layer_of(name) in (1, 3):
            p.data.mul_(0.3)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        with suppressed(modules, 0.3):
            assert all(m.scaling["default"] == 0.3 * s["default"] for m, s in zip(modules, before))
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    assert [dict(m.scaling) for m in modules] == before  # bit-identical, even for 0.3


def test_ist_probes_every_interval_and_updates_scores_from_its_losses():
    trainer = trainer_for("ist", max_steps=7, ist_interval=3, ist_probe_batch=5)
    before = [dict(m.scaling) for m in trainer.model.modules() if hasattr(m, "scale_layer")]
    trainer.train()
    policy = trainer.method.policy
    assert [step for step, _, _ in policy.probes] == [3, 6]  # not at step 0
    scores = torch.zeros(LAYERS, dtype=torch.float64)
    for _, sets, losses in policy.probes:
        assert len(sets) == 3 and all(len(s) == 2 for s in sets)  # int(0.5·4) layers suppressed
        scores = ist_score_update(scores, sets, losses, 10.0)
    assert torch.equal(policy.scores, scores)
    assert [dict(m.scaling) for m in trainer.model.modules() if hasattr(m, "scale_layer")] == before
    assert policy.batches.position == 10  # two probe batches of 5 drawn from the training set


def test_fisher_ranking_matches_a_slow_reference():
    model = lora_model(LAYERS)
    before = copy.deepcopy(model)
    collator = Collator()
    trainer = trainer_for("fisher", model=model, collator=collator, fisher_layers=2, fisher_samples=5)
    trainer.train()
    policy = trainer.method.policy
    assert len(policy.indices) == 5
    data = dataset()
    # reference: .backward() one example at a time, square .grad, average, sum Frobenius norms
    before.eval()
    sums = {n: torch.zeros_like(p) for n, p in before.named_parameters() if p.requires_grad}
    for i in policy.indices:
        before.zero_grad()
        row = data[i]
        out = before(input_ids=row["input_ids"][None], attention_mask=row["attention_mask"][None])
        per_sample_loss(out.logits, row["labels"][None]).mean().backward()
        for n, p in before.named_parameters():
            if p.requires_grad:
                sums[n] += p.grad**2
    per_layer = [[s / 5 for n, s in sums.items() if layer_of(n) == layer] for layer in range(LAYERS)]
    reference = fisher_layer_scores(per_layer)
    torch.testing.assert_close(policy.scores, reference, rtol=1e-5, atol=0)
    assert policy.chosen.tolist() == sorted(reference.topk(2).indices.tolist())
    assert [active for _, active in trainer.method.history] == [tuple(policy.chosen.tolist())]


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(ist_layer_fraction=0.0), "ist_layer_fraction"),
        (dict(ist_probe_fraction=1.5), "ist_probe_fraction"),
        (dict(ist_interval=0), "ist_interval"),
        (dict(ist_suppression=0.0), "ist_suppression"),
        (dict(lisa_layers=0), "lisa_layers"),
        (dict(fisher_layers=2.5), "fisher_layers"),
        (dict(select_fraction=0.0), "select_fraction"),
        (dict(greats_val="test"), "greats_val"),
    ],
)
def test_bad_baseline_config_is_rejected(overrides, message):
    with pytest.raises(GastuneError, match=message):
        config(method="ist", **overrides)


def test_lisa_asking_for_more_layers_than_the_model_has_fails_before_any_update():
    model = lora_model(LAYERS)
    before = trainable(model)
    with pytest.raises(GastuneError, match="cannot train 5"):
        trainer_for("lisa", model=model, lisa_layers=5).train()
    assert all(torch.equal(p, before[n]) for n, p in trainable(model).items())


def test_ist_needs_peft_scaling_api():
    from tests.conftest import tiny_model

    with pytest.raises(GastuneError, match="scaling API"):
        trainer_for("ist", model=tiny_model("llama", layers=LAYERS)).train()


def test_lisa_in_full_parameter_mode_keeps_embeddings_and_head_training():
    from tests.conftest import tiny_model

    def run(keep):
        model = tiny_model("llama", layers=LAYERS)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = trainer_for("lisa", model=model, lisa_layers=1, lisa_keep_outside=keep)
        trainer.train()
        (_, active), *_ = trainer.method.history
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        return active, moved

    active, moved = run(True)
    assert any("embed_tokens" in n for n in moved) and any("lm_head" in n for n in moved)
    assert {layer_of(n) for n in moved if ".layers." in n} == set(active)
    active, moved = run(False)
    assert moved and all(".layers." in n for n in moved)

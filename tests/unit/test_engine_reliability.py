"""Issue 11, point 6: the GAST engine never selects on nothing.

- reentrant activation checkpointing: the support pass still reaches the adapters;
- a zero or non-finite support gradient: a counted, logged fallback to the batch's own
  direction, never a silent uniform draw;
- a sample with no target token is never selected;
- standardisation is scale-free: the loss's 1/N and 1/GA factors and small adapter weights
  do not change which samples are chosen.
"""

from __future__ import annotations

import logging

import pytest
import torch

from gastune.engine import GastEngine, GastSettings, has_target_tokens, per_sample_loss, support_gradients
from gastune.engine.reference import reference_gast_gradients
from gastune.engine.stats import summarize
from gastune.errors import GastuneError
from gastune.selection.sampling import selection_probs, standardize
from tests.conftest import make_batch
from tests.unit.test_engine import adapted, assert_matches_reference


def reentrant(tuner="lora"):
    model = adapted("llama", tuner)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    return model


# ---------------------------------------------------------------- reentrant checkpointing
def test_support_gradient_is_exact_under_reentrant_checkpointing():
    plain, checkpointed = adapted("llama", "lora"), reentrant()
    checkpointed.load_state_dict(plain.state_dict())
    batch = make_batch(n=3, seed=9)
    expected = support_gradients(plain, batch, GastEngine(plain).block_parameters)
    engine = GastEngine(checkpointed)
    got = support_gradients(checkpointed, batch, engine.block_parameters)
    params = [p for block in engine.block_parameters for p in block]
    plain_params = [p for block in GastEngine(plain).block_parameters for p in block]
    assert all(got[id(p)].abs().sum() > 0 for p in params), "a block got an all-zero support gradient"
    for p, q in zip(params, plain_params):
        assert torch.allclose(got[id(p)], expected[id(q)], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in params)  # nothing leaked into .grad
    # the model's own setting is restored afterwards
    layer = next(m for m in checkpointed.modules() if getattr(m, "gradient_checkpointing", False))
    assert layer._gradient_checkpointing_func.keywords["use_reentrant"] is True


@pytest.mark.parametrize("tuner", ["lora", "dora"])
def test_engine_equals_reference_under_reentrant_checkpointing(tuner):
    _, records = assert_matches_reference(reentrant(tuner), GastSettings(k=3))
    assert not any(r.support_fallback for r in records)
    assert all(len(set(r.scores)) > 1 for r in records)  # real scores, not all equal


def test_a_support_pass_that_reaches_no_adapter_is_an_error():
    model = adapted("llama", "lora")
    stray = torch.nn.Parameter(torch.zeros(3))  # not used by the model: autograd never reaches it
    with pytest.raises(GastuneError, match="reached none of the adapter parameters"):
        support_gradients(model, make_batch(n=2, seed=9), [[stray]])


# ---------------------------------------------------------------- unusable support gradients
def _run(model, support, batch, settings=None, seed=5, eligible=None, scale=1.0):
    engine = GastEngine(model, settings or GastSettings(k=3)).attach()
    model.zero_grad(set_to_none=True)
    with engine.step(batch["input_ids"].shape[0], support, seed, eligible=eligible):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        (per_sample_loss(out.logits, batch["labels"]).mean() * scale).backward()
    grads = {id(p): p.grad.clone() for p in model.parameters() if p.requires_grad}
    engine.detach()
    return engine, grads


@pytest.mark.parametrize("bad", [0.0, float("nan")], ids=["zero", "nan"])
def test_unusable_support_falls_back_to_the_batch_direction_counted_and_logged(bad, caplog):
    model = adapted("llama", "lora")
    batch = make_batch(n=6)
    engine = GastEngine(model)
    support = {id(p): torch.full_like(p, bad) for block in engine.block_parameters for p in block}
    with caplog.at_level(logging.WARNING, logger="gastune.engine.gast"):
        fallback, grads = _run(model, support, batch)
    _, batch_grads = _run(model, None, batch)  # support=batch: the batch's own mean gradient
    n_groups = len(fallback.groups)
    assert fallback.support_fallbacks == n_groups
    assert all(r.support_fallback for r in fallback.records)
    assert summarize(fallback.records, 6, n_groups)["support_fallback_frac"] == 1.0  # gast/… in the logs
    assert any("zero or non-finite support gradient" in r.message for r in caplog.records)
    for key, g in grads.items():
        assert torch.equal(g, batch_grads[key])
    assert all(len(set(r.scores)) > 1 for r in fallback.records)  # a real ranking, not uniform
    # the reference does the same
    ref = reference_gast_gradients(
        model, batch, GastSettings(k=3), None, 5, groups=[g.params for g in fallback.groups]
    )
    for key, g in ref.items():
        assert torch.allclose(grads[key], g, rtol=1e-4, atol=1e-6)


def test_every_support_sample_non_finite_is_a_counted_fallback():
    model = adapted("llama", "lora")
    support_batch = make_batch(n=2, seed=9)
    token = 99
    for key in ("input_ids", "labels"):
        support_batch[key][support_batch[key] == token] = 1
    support_batch["input_ids"][:, 3] = token
    engine = GastEngine(model)
    with torch.no_grad():
        saved = model.get_input_embeddings().weight[token].clone()
        model.get_input_embeddings().weight[token] = float("inf")
    support = support_gradients(model, support_batch, engine.block_parameters)
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = saved
    used, _ = _run(model, support, make_batch(n=6))
    assert used.support_fallbacks == len(used.groups)


# ---------------------------------------------------------------- samples without a target
def test_a_sample_without_target_tokens_is_never_selected():
    model = adapted("llama", "lora")
    batch = make_batch(n=6)
    batch["labels"][2] = -100  # e.g. a prompt that filled the whole context
    assert has_target_tokens(batch["labels"]).tolist() == [True, True, False, True, True, True]
    for settings in (
        GastSettings(k=5),
        GastSettings(k=5, selection="topk"),
        GastSettings(k=5, selection="random"),
    ):
        for eligible in (None, has_target_tokens(batch["labels"])):
            engine, grads = _run(model, None, batch, settings, eligible=eligible)
            assert all(2 not in r.chosen and len(r.chosen) == 5 for r in engine.records)
            ref = reference_gast_gradients(
                model, batch, settings, None, 5, groups=[g.params for g in engine.groups], eligible=eligible
            )
            for key, g in ref.items():
                assert torch.allclose(grads[key], g, rtol=1e-4, atol=1e-6)


def test_samples_marked_ineligible_are_never_selected_and_fewer_than_k_keeps_all():
    model = adapted("llama", "lora")
    batch = make_batch(n=6)
    eligible = torch.tensor([True, False, True, False, False, False])
    engine, grads = _run(model, None, batch, GastSettings(k=4), eligible=eligible)
    assert all(r.chosen == [0, 2] for r in engine.records)
    ref = reference_gast_gradients(
        model, batch, GastSettings(k=4), None, 5, groups=[g.params for g in engine.groups], eligible=eligible
    )
    for key, g in ref.items():
        assert torch.allclose(grads[key], g, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- scale-free standardisation
def test_standardize_is_scale_free():
    a = torch.tensor([0.3, -1.2, 2.5, 0.0, 0.7], dtype=torch.float64)
    for c in (1e-15, 1e-9, 1e-3, 1.0, 1e6):
        assert torch.allclose(standardize(a * c), standardize(a), rtol=1e-12, atol=1e-12)
    assert torch.equal(standardize(torch.zeros(4)), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(standardize(torch.full((3,), 2.5)), torch.zeros(3, dtype=torch.float64))


def test_small_lora_weights_and_gradient_accumulation_do_not_flatten_the_choice():
    """LoRA weights scaled down 100×, and the loss's 1/GA for GA = 64 (a power of two, so the
    scores scale exactly): the selection probabilities and choices are those of GA = 1."""
    model = adapted("llama", "lora")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(0.01)
    batch, support_batch = make_batch(n=6), make_batch(n=2, seed=9)
    engine = GastEngine(model)
    support = support_gradients(model, support_batch, engine.block_parameters)
    one, grads_one = _run(model, support, batch)
    many, grads_many = _run(model, support, batch, scale=1 / 64)
    for r1, r64 in zip(one.records, many.records):
        s1, s64 = torch.tensor(r1.scores), torch.tensor(r64.scores)
        assert s64.abs().max() < 1e-6  # small enough that an absolute ε of 1e-8 would matter
        assert r1.chosen == r64.chosen
        assert torch.allclose(selection_probs(s64), selection_probs(s1), rtol=1e-9, atol=1e-12)
        # ... and it would: the old (std + 1e-8) denominator moves z by more than 1 %
        old = (s64 - s64.mean()) / (s64.std(unbiased=False) + 1e-8)
        exact = (s64 - s64.mean()) / s64.std(unbiased=False)
        assert (old - exact).abs().max() > 0.01 * exact.abs().max()
    for key, g in grads_one.items():
        assert torch.allclose(grads_many[key] * 64, g, rtol=1e-5, atol=1e-9)


def test_per_sample_scoring_is_exact_under_reentrant_checkpointing():
    """The data-selection methods' scoring pass (gradnorm, greats) uses autograd.grad too."""
    from gastune.methods.persample import PerSampleGradients

    plain, checkpointed = adapted("llama", "lora"), reentrant()
    checkpointed.load_state_dict(plain.state_dict())
    batch = make_batch(n=4)
    expected = PerSampleGradients(plain).score(batch, gram=True)
    got = PerSampleGradients(checkpointed).score(batch, gram=True)
    assert got.sq_norms.min() > 0
    assert torch.allclose(got.sq_norms, expected.sq_norms, rtol=1e-5)
    assert torch.allclose(got.gram, expected.gram, rtol=1e-5, atol=1e-12)


def test_a_nan_sample_does_not_spoil_the_batch_support():
    """support=batch: the batch mean is taken over finite samples, so one NaN sample does not
    make every score NaN (which used to select nothing and deliver a zero gradient)."""
    model = adapted("llama", "lora")
    batch = make_batch(n=6)
    engine = GastEngine(model, GastSettings(k=5)).attach()
    model.zero_grad(set_to_none=True)
    with engine.step(6, None, 3):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        losses = per_sample_loss(out.logits, batch["labels"])
        (losses * torch.tensor([1, 1, float("nan"), 1, 1, 1])).mean().backward()
    assert all(r.chosen == [0, 1, 3, 4, 5] for r in engine.records)
    engine.detach()
    block_grads = [p.grad for p in engine.block_parameters[0]]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in block_grads)


def test_trainer_gast_step_is_unchanged_by_reentrant_checkpointing(tmp_path, monkeypatch):
    """Through the Trainer (gradient_checkpointing=True, use_reentrant=True): the same update as
    without checkpointing, and no support fallback was needed."""
    import copy

    from gastune.training import GastuneTrainer
    from tests.helpers import lora_model, row_dataset, sgd_config, trainable

    monkeypatch.chdir(tmp_path)
    base = lora_model()
    after, fallbacks = [], []
    for extra in (
        {},
        {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
    ):
        model = copy.deepcopy(base)
        args = sgd_config(method="gast", gast_k=2, gast_support="train", gast_support_size=3, **extra)
        trainer = GastuneTrainer(model=model, args=args, train_dataset=row_dataset(), data_collator=None)
        trainer.train()
        after.append(trainable(model))
        fallbacks.append(trainer.method.engine.support_fallbacks)
    assert fallbacks == [0, 0]
    assert after[0].keys() == after[1].keys()
    for name, value in after[0].items():
        assert torch.allclose(after[1][name], value, rtol=1e-5, atol=1e-7), name
    assert any(not torch.equal(v, p) for (n, v), p in zip(after[0].items(), trainable(base).values()))

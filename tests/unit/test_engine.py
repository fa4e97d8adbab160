"""The GAST engine against the slow reference: same indices per block, same update (fp32)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from gastune.engine import GastEngine, GastSettings, per_sample_loss, support_gradients
from gastune.engine.reference import reference_gast_gradients
from gastune.errors import GastuneError
from gastune.training.adapters import build_peft_config
from tests.conftest import make_batch, tiny_model


def adapted(family="llama", tuner="lora", checkpointing=False, **kw):
    model = tiny_model(family)
    cfg = build_peft_config(model, tuner=tuner, r=4, alpha=8, dropout=0.0, **kw)
    if tuner in ("lora", "dora"):
        cfg.init_lora_weights = False  # non-zero B, so every adapter tensor has a gradient
    elif tuner == "ia3":
        cfg.init_ia3_weights = False
    model = get_peft_model(model, cfg)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def engine_grads(model, batch, settings, support_batch, seed):
    engine = GastEngine(model, settings).attach()
    support = (
        None if support_batch is None else support_gradients(model, support_batch, engine.block_parameters)
    )
    model.zero_grad(set_to_none=True)
    with engine.step(batch["input_ids"].shape[0], support, seed):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        per_sample_loss(out.logits, batch["labels"]).mean().backward()
    grads = {id(p): p.grad.detach().clone() for p in model.parameters() if p.requires_grad}
    groups = [g.params for g in engine.groups]
    records = engine.records
    engine.detach()
    return grads, groups, records


def assert_matches_reference(model, settings, support=True, seed=7):
    batch = make_batch(n=6)
    support_batch = make_batch(n=2, seed=9) if support else None
    grads, groups, records = engine_grads(model, batch, settings, support_batch, seed)
    ref = reference_gast_gradients(model, batch, settings, support_batch, seed, groups=groups)
    assert set(ref) == set(grads)
    for key, g in grads.items():
        assert torch.allclose(g, ref[key], rtol=1e-4, atol=1e-6), (g - ref[key]).abs().max()
    # every group kept exactly k samples
    assert all(len(r.chosen) == settings.k_for(6) for r in records)
    return grads, records


@pytest.mark.parametrize(
    "family,tuner",
    [
        ("llama", "lora"),
        ("llama", "dora"),
        ("qwen2", "lora"),
        ("gpt2", "lora"),
        ("llama", "ia3"),
        ("llama", "loha"),
    ],
)
def test_engine_equals_reference(family, tuner):
    assert_matches_reference(adapted(family, tuner), GastSettings(k=3))


@pytest.mark.parametrize("tuner", ["lora", "dora"])
def test_engine_equals_reference_with_gradient_checkpointing(tuner):
    assert_matches_reference(adapted("llama", tuner, checkpointing=True), GastSettings(k=3))


@pytest.mark.parametrize(
    "settings",
    [
        GastSettings(k=2, selection="topk"),
        GastSettings(k=4, selection="random"),
        GastSettings(k=0.5, score="cosine", temperature=0.3),
        GastSettings(k=3, granularity="module"),
    ],
)
def test_engine_equals_reference_for_every_option(settings):
    assert_matches_reference(adapted("llama", "lora"), settings)


def test_support_from_the_batch_itself():
    assert_matches_reference(adapted("llama", "lora"), GastSettings(k=3), support=False)


def test_blocks_choose_different_samples_and_unselected_samples_do_not_count():
    model = adapted("llama", "lora")
    _, records = assert_matches_reference(model, GastSettings(k=2, selection="topk"))
    assert len({tuple(r.chosen) for r in records}) > 1, "every block picked the same samples"


def test_parameters_outside_blocks_get_the_plain_batch_mean():
    model = tiny_model("llama")
    cfg = build_peft_config(model, r=4, alpha=8, dropout=0.0)
    cfg.init_lora_weights = False
    cfg.modules_to_save = ["lm_head"]
    model = get_peft_model(model, cfg)
    batch = make_batch(n=6)
    grads, _, _ = engine_grads(model, batch, GastSettings(k=3), None, 1)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lm_head" in n]
    assert head
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    (expected,) = torch.autograd.grad(per_sample_loss(out.logits, batch["labels"]).mean(), head)
    assert torch.allclose(grads[id(head[0])], expected, atol=1e-6)


def test_detach_restores_the_model():
    model = adapted("llama", "lora")
    batch = make_batch()
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"]).logits
    engine = GastEngine(model, GastSettings(k=2)).attach()
    engine.detach()
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, before)


def test_nan_sample_is_never_selected():
    model = adapted("llama", "lora")
    batch = make_batch(n=6)
    engine = GastEngine(model, GastSettings(k=5)).attach()
    with engine.step(6, None, 3):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        losses = per_sample_loss(out.logits, batch["labels"])
        poisoned = losses * torch.tensor([1, 1, float("nan"), 1, 1, 1])
        poisoned.mean().backward()
    assert all(2 not in r.chosen for r in engine.records)
    for p in model.parameters():
        if p.requires_grad and "layers" in "".join(n for n, q in model.named_parameters() if q is p):
            assert torch.isfinite(p.grad).all()


def test_bad_settings_are_rejected():
    with pytest.raises(GastuneError, match="temperature"):
        GastSettings(temperature=0)
    with pytest.raises(GastuneError, match="count"):
        GastSettings(k=1.5)
    with pytest.raises(GastuneError, match="selection"):
        GastSettings(selection="greedy")
    model = adapted("llama", "lora")
    engine = GastEngine(model, GastSettings(k=8)).attach()
    with pytest.raises(GastuneError, match="exceeds"), engine.step(6):
        pass


def test_no_adapter_inside_blocks_is_rejected():
    model = tiny_model("llama")
    cfg = build_peft_config(model, r=4, alpha=8, dropout=0.0)
    cfg.target_modules = ["lm_head"]
    with pytest.raises(GastuneError, match="no trainable adapter"):
        GastEngine(get_peft_model(model, cfg))


def test_support_gradient_ignores_a_sample_with_a_nonfinite_loss():
    model = adapted("llama", "lora")
    engine = GastEngine(model, GastSettings(k=2))
    support = make_batch(n=3, seed=9)
    token = 99  # poison row 1 only: an inf embedding for a token only it holds
    for key in ("input_ids", "labels"):
        support[key][support[key] == token] = 1
    support["input_ids"][1, 4] = token
    clean = {k: v[[0, 2]] for k, v in support.items()}
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("inf")
    got = support_gradients(model, support, engine.block_parameters)
    expected = support_gradients(model, clean, engine.block_parameters)
    assert all(torch.isfinite(g).all() for g in got.values())
    assert all(torch.allclose(got[k], expected[k], atol=1e-7) for k in expected)

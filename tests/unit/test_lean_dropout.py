"""gastune's LoRA dropout (a saved mask, the output recomputed for backward) against peft's
own: the same random draw, the same losses, gradients, selections and trained weights."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from gastune.engine import GastEngine, GastSettings, support_gradients
from gastune.engine import fused_loss as fused_loss_module
from gastune.engine.fused_loss import model_per_sample_loss
from gastune.engine.lean_dropout import _MaskedDropout, lean_lora_dropout
from gastune.engine.loss import per_sample_loss
from gastune.training import GastuneTrainer
from gastune.training.adapters import build_peft_config
from tests.conftest import make_batch, tiny_model
from tests.helpers import lora_model, row_dataset, stack_rows, trainable
from tests.helpers import sgd_config as config

P = 0.3
LAYERS = 3
ADAPTED_PER_LAYER = 5  # q, k, v, up, down


def dropout_lora(checkpointing: str | None = None) -> torch.nn.Module:
    model = tiny_model("llama", layers=LAYERS)
    cfg = build_peft_config(model, tuner="lora", r=4, alpha=8, dropout=P)
    cfg.init_lora_weights = False  # non-zero B, so every adapter tensor has a gradient
    model = get_peft_model(model, cfg)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
    return model.train()


@pytest.fixture
def peft_dropout(monkeypatch):
    """Turns gastune's dropout off in the loss path: today's peft forward, the reference."""

    def use_peft(enabled: bool) -> None:
        if enabled:
            monkeypatch.setattr(fused_loss_module, "lean_lora_dropout", lambda model: nullcontext())
        else:
            monkeypatch.undo()

    return use_peft


def step(model, batch, bf16=False, seed=11):
    """Losses and adapter gradients of one forward/backward through gastune's loss path."""
    model.zero_grad(set_to_none=True)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    torch.manual_seed(seed)  # the dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        losses, _ = model_per_sample_loss(model, inputs, batch["labels"])
    (losses * torch.linspace(0.5, 1.5, len(losses))).sum().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b, exact=True):
    assert a.keys() == b.keys() and a
    for name in a:
        assert b[name].abs().sum() > 0, name
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_dropout_is_f_dropout_bit_for_bit(dtype):
    x = torch.randn(3, 7, 40, dtype=dtype).requires_grad_()
    grad_out = torch.randn(3, 7, 40, dtype=dtype)
    torch.manual_seed(0)
    ours = _MaskedDropout.apply(x, P, [])
    (g_ours,) = torch.autograd.grad(ours, x, grad_out)
    after_ours = torch.rand(1)
    torch.manual_seed(0)
    theirs = F.dropout(x, P, training=True)
    (g_theirs,) = torch.autograd.grad(theirs, x, grad_out)
    after_theirs = torch.rand(1)
    assert torch.equal(ours, theirs) and torch.equal(g_ours, g_theirs)
    assert torch.equal(after_ours, after_theirs)  # the same random numbers were consumed
    assert 0 < (ours == 0).float().mean() < 1


@pytest.mark.parametrize("bf16", [False, True])
def test_loss_path_equals_peft_dropout(peft_dropout, bf16):
    batch = make_batch(n=4)
    lean_losses, lean = step(dropout_lora(), batch, bf16=bf16)
    peft_dropout(True)
    peft_losses, peft = step(dropout_lora(), batch, bf16=bf16)
    assert torch.equal(lean_losses, peft_losses)
    assert_same(lean, peft)
    _, other_masks = step(dropout_lora(), batch, bf16=bf16, seed=12)
    assert not torch.equal(other_masks[next(iter(peft))], peft[next(iter(peft))])  # dropout is live


def test_every_adapted_module_saves_a_recipe_and_the_model_is_restored():
    model = dropout_lora()
    batch = make_batch(n=4)
    with lean_lora_dropout(model) as registry:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert registry.recomputable == LAYERS * ADAPTED_PER_LAYER
    assert not registry.outputs  # no dropout output outlived the forward
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.Dropout))
    per_sample_loss(out.logits, batch["labels"]).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_recompute_refuses_an_input_changed_in_place():
    model = dropout_lora()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 10, 32, requires_grad=True) * 1.0
    with lean_lora_dropout(model):
        y = layer(x)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
def test_with_gradient_checkpointing(peft_dropout, checkpointing):
    batch = make_batch(n=3)
    _, lean = step(dropout_lora(checkpointing), batch)
    peft_dropout(True)
    _, peft = step(dropout_lora(checkpointing), batch)
    _, plain = step(dropout_lora(), batch)  # checkpointing recomputes the same masks
    assert_same(lean, peft)
    assert_same(lean, plain, exact=False)


def engine_step(model, batch, support_batch, lean: bool, seed=5):
    engine = GastEngine(model, GastSettings(k=2)).attach()
    torch.manual_seed(3)
    support = support_gradients(model, support_batch, engine.block_parameters)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(4)
    with engine.step(batch["input_ids"].shape[0], support, seed):
        with lean_lora_dropout(model) if lean else nullcontext() as registry:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        per_sample_loss(out.logits, batch["labels"]).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    chosen = [r.chosen for r in engine.records]
    engine.detach()
    return grads, chosen, registry


def test_gast_engine_equals_peft_dropout(peft_dropout):
    batch, support_batch = make_batch(n=6), make_batch(n=2, seed=9)
    lean, lean_chosen, registry = engine_step(dropout_lora(), batch, support_batch, lean=True)
    assert registry.recomputable == LAYERS * ADAPTED_PER_LAYER  # the engine's saved inputs too
    peft_dropout(True)
    peft, peft_chosen, _ = engine_step(dropout_lora(), batch, support_batch, lean=False)
    assert lean_chosen == peft_chosen and lean_chosen
    assert_same(lean, peft)


@pytest.mark.parametrize("method", ["lora", "gast"])
def test_trainer_trains_the_same_weights(peft_dropout, tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)

    def train():
        torch.manual_seed(0)
        model = lora_model(dropout=P)
        extra = dict(gast_k=2, gast_support_size=2) if method == "gast" else {}
        cfg = config(method=method, max_steps=2, **extra)
        GastuneTrainer(model=model, args=cfg, train_dataset=row_dataset(), data_collator=stack_rows).train()
        return trainable(model)

    lean = train()
    peft_dropout(True)
    assert_same(lean, train())

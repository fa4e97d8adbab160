"""Chunked and fused per-sample losses against the plain one: same losses, same gradients."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from gastune.engine import GastEngine, GastSettings, support_gradients
from gastune.engine import loss as loss_module
from gastune.engine.fused_loss import fusable_head, model_per_sample_loss
from gastune.engine.loss import per_sample_loss, plain_per_sample_loss
from gastune.engine.reference import reference_gast_gradients
from gastune.training.adapters import build_peft_config
from tests.conftest import VOCAB, make_batch, tiny_model
from tests.unit.test_engine import adapted


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # 7 tokens per chunk at the tiny vocabulary: every batch spans several chunks, one partial.
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 7 * VOCAB)


def lora(family="llama", checkpointing=False, modules_to_save=None):
    if modules_to_save is None:
        return adapted(family, checkpointing=checkpointing)
    model = tiny_model(family)
    cfg = build_peft_config(model, tuner="lora", r=4, alpha=8, dropout=0.0)
    cfg.init_lora_weights, cfg.modules_to_save = False, modules_to_save
    return get_peft_model(model, cfg).train()


def losses_and_grads(model, batch, fused: bool, bf16: bool = False):
    model.zero_grad(set_to_none=True)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if fused:
            losses, _ = model_per_sample_loss(model, inputs, batch["labels"])
        else:
            losses = plain_per_sample_loss(model(**inputs).logits, batch["labels"])
    (losses * torch.linspace(0.5, 1.5, len(losses))).sum().backward()  # per-sample weights reach grads
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_plain(dtype):
    g = torch.Generator().manual_seed(0)
    batch = make_batch(n=4, t=9)
    logits = torch.randn(4, 9, VOCAB, generator=g).to(dtype).requires_grad_()
    weights = torch.rand(4, generator=g)
    chunked = per_sample_loss(logits, batch["labels"])
    (grad_chunked,) = torch.autograd.grad((chunked * weights).sum(), logits)
    plain = plain_per_sample_loss(logits, batch["labels"])
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), logits)
    assert chunked.dtype == torch.float32 and grad_chunked.dtype == dtype
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(grad_chunked, grad_plain, **tol)
    assert grad_plain.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_loss_equals_plain(family, bf16):
    model = lora(family)
    assert fusable_head(model) is not None
    batch = make_batch(n=4)
    fused, g_fused = losses_and_grads(model, batch, fused=True, bf16=bf16)
    plain, g_plain = losses_and_grads(model, batch, fused=False, bf16=bf16)
    tol = dict(rtol=1e-5, atol=1e-6) if not bf16 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(fused, plain, **tol)
    assert g_fused.keys() == g_plain.keys() and g_plain
    for name in g_plain:
        scale = g_plain[name].abs().max()
        assert scale > 0, name
        gtol = dict(rtol=1e-4, atol=1e-6 * scale) if not bf16 else dict(rtol=5e-2, atol=2e-2 * scale)
        torch.testing.assert_close(g_fused[name], g_plain[name], **gtol)
    assert "forward" not in model.get_output_embeddings().__dict__  # the swap was undone


def test_fused_loss_projects_only_tokens_with_a_target(monkeypatch):
    # Loss on the response alone: most positions have no target. The output projection must
    # see only the positions that do, and losses and gradients must not change.
    batch = make_batch(n=4, t=12)
    batch["labels"][:, :8] = -100  # a long "prompt"
    batch["labels"][1] = -100  # a row with no target at all
    model = lora()
    plain, g_plain = losses_and_grads(model, batch, fused=False)
    from gastune.engine import fused_loss

    seen = []
    real_linear = fused_loss.F.linear

    def counting_linear(x, weight, bias=None):
        if weight is model.get_output_embeddings().weight:
            seen.append(x.shape[0])
        return real_linear(x, weight, bias)

    monkeypatch.setattr(fused_loss.F, "linear", counting_linear)
    fused, g_fused = losses_and_grads(model, batch, fused=True)
    with_target = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < with_target < batch["labels"].numel() // 2
    assert sum(seen) == with_target  # one forward over exactly those rows (fp32: no recompute)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert fused[1] == 0
    for name in g_plain:
        torch.testing.assert_close(
            g_fused[name], g_plain[name], rtol=1e-4, atol=1e-6 * g_plain[name].abs().max()
        )


def test_fused_loss_with_gradient_checkpointing():
    batch = make_batch(n=3)
    _, plain = losses_and_grads(lora(), batch, fused=False)
    _, fused = losses_and_grads(lora(checkpointing=True), batch, fused=True)
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-4, atol=1e-7)


def test_trained_head_falls_back_to_logits_and_gets_its_gradient():
    model = lora(modules_to_save=["lm_head"])
    assert fusable_head(model) is None
    batch = make_batch(n=3)
    fused, g_fused = losses_and_grads(model, batch, fused=True)
    plain, g_plain = losses_and_grads(model, batch, fused=False)
    torch.testing.assert_close(fused, plain)
    head = [n for n in g_plain if "lm_head" in n]
    assert head and all(g_plain[n].abs().sum() > 0 for n in head)
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], rtol=1e-4, atol=1e-7)


def test_fused_loss_without_grad_gives_the_losses():
    model = lora()
    batch = make_batch(n=3)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        fused, _ = model_per_sample_loss(model, inputs, batch["labels"])
        plain = plain_per_sample_loss(model(**inputs).logits, batch["labels"])
    torch.testing.assert_close(fused, plain)


def test_gast_engine_with_fused_loss_equals_reference():
    model = lora()
    batch, support_batch = make_batch(n=6), make_batch(n=2, seed=9)
    settings = GastSettings(k=3)
    engine = GastEngine(model, settings).attach()
    support = support_gradients(model, support_batch, engine.block_parameters)
    model.zero_grad(set_to_none=True)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with engine.step(6, support, step_seed=5):
        losses, _ = model_per_sample_loss(model, inputs, batch["labels"])
        losses.mean().backward()
    groups = [g.params for g in engine.groups]
    engine.detach()
    grads = {id(p): p.grad.clone() for p in model.parameters() if p.requires_grad}
    ref = reference_gast_gradients(model, batch, settings, support_batch, 5, groups=groups)
    assert set(ref) == set(grads)
    for key, g in grads.items():
        torch.testing.assert_close(g, ref[key], rtol=1e-4, atol=1e-6)

"""The engine, the fused loss and the one-pass support on a chosen device, fp32 and bf16.

On the CPU these run in the fast tier; ``benchmarks/gpu_check.sh`` runs the same file with
``GASTUNE_TEST_DEVICE=cuda`` (a device that is asked for but missing is an error, not a skip).
fp32 demands the reference's selections and update; bf16 (autocast) compares the engine's
scores and its update over its own selection with the reference's per-sample gradients,
because bf16 rounding may legitimately flip a draw between nearly equal scores.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from gastune.engine import GastEngine, GastSettings, support_gradients
from gastune.engine.fused_loss import model_per_sample_loss
from gastune.engine.loss import plain_per_sample_loss
from gastune.engine.reference import reference_gast_gradients
from gastune.engine.support import one_pass_loss
from gastune.methods.rows import join_rows
from tests.conftest import make_batch
from tests.unit.test_engine import adapted

DEVICE = torch.device(os.environ.get("GASTUNE_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("GASTUNE_TEST_DEVICE=cuda but torch sees no CUDA device")


def on_device(batch):
    return {k: v.to(DEVICE) for k, v in batch.items()}


def model_on_device():
    return adapted("llama").to(DEVICE)


def autocast(bf16: bool):
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16)


def engine_step(model, batch, settings, support_batch, seed, bf16):
    engine = GastEngine(model, settings).attach()
    with autocast(bf16):
        support = support_gradients(model, support_batch, engine.block_parameters)
    model.zero_grad(set_to_none=True)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with engine.step(batch["input_ids"].shape[0], support, seed):
        with autocast(bf16):
            losses, _ = model_per_sample_loss(model, inputs, batch["labels"])
        losses.mean().backward()
    grads = {id(p): p.grad.detach().clone() for p in model.parameters() if p.requires_grad}
    engine.detach()
    return engine, grads


def test_engine_equals_reference_fp32():
    model = model_on_device()
    batch, support_batch = on_device(make_batch(n=6)), on_device(make_batch(n=2, seed=9))
    settings = GastSettings(k=3)
    engine, grads = engine_step(model, batch, settings, support_batch, 7, bf16=False)
    groups = [g.params for g in engine.groups]
    ref = reference_gast_gradients(model, batch, settings, support_batch, 7, groups=groups)
    assert set(ref) == set(grads)
    for key, g in grads.items():
        assert g.device.type == DEVICE.type
        torch.testing.assert_close(g, ref[key], rtol=1e-4, atol=1e-6)


def per_sample_grads(model, batch, params):
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        with autocast(True):
            out = model(
                input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1]
            )
            loss = plain_per_sample_loss(out.logits, batch["labels"][i : i + 1]).mean()
        rows.append(torch.autograd.grad(loss, params))
    return [torch.stack(gs).float() for gs in zip(*rows)]


def test_engine_scores_and_update_bf16():
    model = model_on_device()
    batch, support_batch = on_device(make_batch(n=6)), on_device(make_batch(n=2, seed=9))
    engine, grads = engine_step(model, batch, GastSettings(k=3), support_batch, 7, bf16=True)
    records = {r.group: r for r in engine.records}  # backward visits the blocks last-first
    assert sorted(records) == [g.index for g in engine.groups]
    for group in engine.groups:
        record = records[group.index]
        assert len(record.chosen) == 3
        per_sample = per_sample_grads(model, batch, group.params)
        with autocast(True):
            support = support_gradients(model, support_batch, [group.params])
        # the engine's per-sample gradients are those of the batch-mean loss: g_i / N
        dots = (
            sum(g.flatten(1) @ support[id(p)].float().flatten() for g, p in zip(per_sample, group.params)) / 6
        )
        scale = dots.abs().max()
        torch.testing.assert_close(
            torch.tensor(record.scores, dtype=torch.float32), dots.cpu(), rtol=0.1, atol=0.05 * scale.item()
        )
        chosen = torch.tensor(record.chosen, device=DEVICE)
        for p, g in zip(group.params, per_sample):
            expected = g.index_select(0, chosen).mean(dim=0)
            torch.testing.assert_close(
                grads[id(p)].float(), expected, rtol=0.1, atol=0.05 * expected.abs().max().item()
            )


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_loss_equals_plain(bf16):
    model = model_on_device()
    batch = on_device(make_batch(n=4))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    params = [p for p in model.parameters() if p.requires_grad]
    with autocast(bf16):
        fused, _ = model_per_sample_loss(model, inputs, batch["labels"])
    g_fused = torch.autograd.grad(fused.sum(), params)
    with autocast(bf16):
        plain = plain_per_sample_loss(model(**inputs).logits, batch["labels"])
    g_plain = torch.autograd.grad(plain.sum(), params)
    tol = dict(rtol=2e-2, atol=2e-3) if bf16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused, plain, **tol)
    for a, b in zip(g_fused, g_plain):
        scale = b.abs().max().item()
        gtol = dict(rtol=5e-2, atol=2e-2 * scale) if bf16 else dict(rtol=1e-4, atol=1e-6 * scale)
        torch.testing.assert_close(a, b, **gtol)


def test_one_pass_equals_two_pass_fp32():
    batch, support_batch = on_device(make_batch(n=6)), on_device(make_batch(n=3, t=7, seed=9))
    settings = GastSettings(k=3)
    two_model = model_on_device()
    two_engine, two = engine_step(two_model, batch, settings, support_batch, 11, bf16=False)
    model = model_on_device()
    engine = GastEngine(model, settings).attach()
    combined = join_rows(batch, support_batch)
    with engine.step(6, step_seed=11, support_rows=3):
        losses, _ = model_per_sample_loss(
            model, {k: combined[k] for k in ("input_ids", "attention_mask")}, combined["labels"]
        )
        one_pass_loss(losses, 3)[0].backward()
    assert [r.chosen for r in engine.records] == [r.chosen for r in two_engine.records]
    one = [p.grad for p in model.parameters() if p.requires_grad]
    for a, b in zip(one, [two[id(p)] for p in two_model.parameters() if p.requires_grad]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bf16", [False, True])
def test_lean_lora_dropout_equals_peft_dropout(bf16):
    # On cuda gastune's dropout runs the fused native_dropout kernel, as F.dropout does there.
    from gastune.engine.lean_dropout import lean_lora_dropout
    from tests.unit.test_lean_dropout import dropout_lora

    batch = on_device(make_batch(n=4))
    grads = []
    for lean in (True, False):
        model = dropout_lora().to(DEVICE)
        torch.manual_seed(11)
        with autocast(bf16), lean_lora_dropout(model) if lean else contextlib.nullcontext():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        plain_per_sample_loss(out.logits, batch["labels"]).mean().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for ours, peft in zip(*grads):
        scale = peft.abs().max()
        assert scale > 0  # bit for bit on the CPU (test_lean_dropout.py); a rounding's slack here
        torch.testing.assert_close(ours, peft, rtol=1e-5, atol=1e-6 * scale)

"""Data-only online selection (maxloss, random-half, gradnorm, greats) through GastuneTrainer,
and the per-sample gradient statistics they score with, against a slow one-sample-at-a-time
reference."""

from __future__ import annotations

import copy

import pytest
import torch

from gastune.engine import per_sample_loss, support_gradients
from gastune.methods.persample import PerSampleGradients
from gastune.selection.data_policies import greats_greedy
from tests.conftest import make_batch
from tests.unit._baseline_helpers import LR, Collator, lora_model, loss_grads, trainable, trainer_for

LAYERS = 3


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def block_params(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad and ".layers." in n]


def slow_per_sample(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P) per-sample gradients of all block adapter tensors, one backward per sample, and losses."""
    params = block_params(model)
    rows, losses = [], []
    for i in range(batch["input_ids"].shape[0]):
        out = model(
            input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1]
        )
        loss = per_sample_loss(out.logits, batch["labels"][i : i + 1]).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])
        )
        losses.append(loss.detach())
    return torch.stack(rows).double(), torch.stack(losses).double()


# ---------------------------------------------------------------- scores vs the slow reference
@pytest.mark.parametrize("tuner", ["lora", "dora"])
def test_per_sample_statistics_match_the_slow_reference(tuner):
    model = lora_model(LAYERS, tuner=tuner)
    model.train()
    batch = make_batch(n=5, t=8, seed=4)
    val_batch = make_batch(n=2, t=8, seed=5)
    scorer = PerSampleGradients(model)
    reference = support_gradients(model, val_batch, scorer.block_parameters)
    model.zero_grad(set_to_none=True)
    got = scorer.score(batch, gram=True, reference=reference)
    assert all(p.grad is None for p in model.parameters())  # the scoring pass leaves .grad alone
    g, losses = slow_per_sample(model, batch)
    ref_flat = torch.cat([reference[id(p)].flatten() for p in block_params(model)]).double()
    torch.testing.assert_close(got.losses, losses, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sq_norms, (g * g).sum(dim=1), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(got.gram, g @ g.T, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(got.ref_dots, g @ ref_flat, rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------- one training step each
def run_one_step(method, **overrides):
    model = lora_model(LAYERS)
    before = copy.deepcopy(model)
    collator = Collator()
    trainer = trainer_for(method, model=model, collator=collator, per_device_train_batch_size=6, **overrides)
    return trainer, model, before, collator


def assert_update_is_mean_over(rows, model, before, batch):
    grads = loss_grads(before, batch, rows=rows)
    for name, value in trainable(model).items():
        torch.testing.assert_close(
            value, before.get_parameter(name).detach() - LR * grads[name], rtol=1e-5, atol=1e-6
        )


def assert_row_mask(trainer, rows, n=6):
    (_, mask), *_ = trainer.method.masks
    assert mask.shape == (n, LAYERS)
    assert mask.any(dim=1).nonzero().flatten().tolist() == rows
    assert set(mask.sum(dim=1).tolist()) <= {0, LAYERS}


def test_maxloss_keeps_the_top_half_by_loss_and_steps_on_their_mean():
    trainer, model, before, collator = run_one_step("maxloss")
    trainer.train()
    batch = collator.batches[0]
    with torch.no_grad():
        out = before(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        losses = per_sample_loss(out.logits, batch["labels"])
    rows = sorted(losses.topk(3).indices.tolist())
    assert_row_mask(trainer, rows)
    assert_update_is_mean_over(rows, model, before, batch)


def test_gradnorm_keeps_the_largest_gradient_norms():
    trainer, model, before, collator = run_one_step("gradnorm")
    trainer.train()
    batch = collator.batches[0]
    g, _ = slow_per_sample(before, batch)
    norms = g.norm(dim=1)
    rows = sorted(norms.topk(3).indices.tolist())
    torch.testing.assert_close(trainer.method.last_scores, norms, rtol=1e-4, atol=1e-8)
    assert_row_mask(trainer, rows)
    assert_update_is_mean_over(rows, model, before, batch)


@pytest.mark.parametrize("greats_lr", [None, 50.0])
def test_greats_picks_greedily_with_the_validation_gradient_and_interactions(monkeypatch, greats_lr):
    trainer, model, before, collator = run_one_step("greats", greats_lr=greats_lr)
    seen = []  # the validation batches, recorded once setup (at the first step) built their source
    method = trainer.method
    setup = method.setup

    def recording_setup(trainer_, model_):
        setup(trainer_, model_)
        batch = method.val_rows.batch
        monkeypatch.setattr(method.val_rows, "batch", lambda idx: seen.append(batch(idx)) or seen[-1])

    monkeypatch.setattr(method, "setup", recording_setup)
    trainer.train()
    batch, (val_batch,) = collator.batches[0], seen
    assert val_batch["input_ids"].shape[0] == 2
    g, _ = slow_per_sample(before, batch)
    val = torch.cat([v.flatten() for v in loss_grads(before, val_batch).values()]).double()
    lr = greats_lr if greats_lr is not None else LR
    rows = sorted(greats_greedy(g @ val, g @ g.T, 3, lr).tolist())
    torch.testing.assert_close(trainer.method.last_scores, lr * (g @ val), rtol=1e-4, atol=1e-8)
    assert_row_mask(trainer, rows)
    assert_update_is_mean_over(rows, model, before, batch)


def test_random_half_is_seeded_and_steps_on_the_kept_rows():
    def run(seed):
        trainer, model, before, collator = run_one_step("random-half", seed=seed, max_steps=3)
        trainer.train()
        return trainer, model, before, collator

    trainer, model, before, collator = run(0)
    masks = [m for _, m in trainer.method.masks]
    again = [m for _, m in run(0)[0].method.masks]
    other = [m for _, m in run(1)[0].method.masks]
    assert all(torch.equal(a, b) for a, b in zip(masks, again))
    assert any(not torch.equal(a, b) for a, b in zip(masks, other))
    assert all(m.any(dim=1).sum() == 3 and set(m.sum(dim=1).tolist()) <= {0, LAYERS} for m in masks)

    single, model, before, collator = run_one_step("random-half")
    single.train()
    rows = single.method.masks[0][1].any(dim=1).nonzero().flatten().tolist()
    assert_update_is_mean_over(rows, model, before, collator.batches[0])

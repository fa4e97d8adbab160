"""Numerical safety: non-finite and target-less samples never train anything, and the edge
cases of selection (all-equal scores, N = 1, K = N, a zero support gradient) do not crash.

Trainer runs are one SGD step at a constant lr with clipping off, so parameters move by
exactly -lr × gradient and can be checked against the slow reference.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from peft import get_peft_model

from gastune.engine import GastEngine, GastSettings, per_sample_loss, support_gradients
from gastune.engine.reference import reference_gast_gradients
from gastune.errors import TrainingFailed
from gastune.training import GastuneConfig, GastuneTrainer
from gastune.training.adapters import build_peft_config
from tests.conftest import make_batch, tiny_model
from tests.helpers import LR, sgd_config, stack_rows

POISON = 99  # a token whose (frozen) embedding is +inf: any sample holding it has a NaN loss


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def model_with_head(poison: bool = True) -> torch.nn.Module:
    """Tiny Llama + LoRA (non-zero B) with a trainable lm_head outside the blocks."""
    model = tiny_model("llama", layers=2)
    if poison:
        with torch.no_grad():
            model.get_input_embeddings().weight[POISON] = float("inf")
    cfg = build_peft_config(model, r=2, alpha=4, dropout=0.0)
    cfg.init_lora_weights = False
    cfg.modules_to_save = ["lm_head"]
    return get_peft_model(model, cfg)


def rows(n: int = 4, poisoned: tuple[int, ...] = (), no_target: tuple[int, ...] = ()) -> list[dict]:
    data = make_batch(n=n, t=8, seed=3)
    data["input_ids"][data["input_ids"] == POISON] = 1
    for i in poisoned:
        data["input_ids"][i, 3] = POISON
    for i in no_target:
        data["labels"][i] = -100
    return [{**{k: v[i] for k, v in data.items()}, "index": torch.tensor(i)} for i in range(n)]


def config(**overrides) -> GastuneConfig:
    defaults = dict(dataloader_drop_last=False, gast_k=2, gast_support="batch")
    return sgd_config(**{**defaults, **overrides})


def train_recording(model, data, calls: list | None = None, **overrides):
    """One training step; returns the trainer, the inputs of each method call and the GAST
    step seeds (a micro-batch that had to be re-run is called twice)."""
    trainer = GastuneTrainer(
        model=model, args=config(**overrides), train_dataset=data, data_collator=stack_rows
    )
    calls, seeds = ([] if calls is None else calls), []
    step = trainer.method.training_step

    def recording(trainer_, model_, inputs, run):
        calls.append({k: v.clone() for k, v in inputs.items()})
        return step(trainer_, model_, inputs, run)

    trainer.method.training_step = recording
    engine_step = GastEngine.step

    def recording_engine_step(self, batch_size, support=None, step_seed=0, **kwargs):
        seeds.append(step_seed)
        return engine_step(self, batch_size, support, step_seed, **kwargs)

    GastEngine.step = recording_engine_step
    try:
        trainer.train()
    finally:
        GastEngine.step = engine_step
    return trainer, calls, seeds


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def dense_grads(model, batch) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = per_sample_loss(out.logits, batch["labels"]).mean()
    return dict(zip([n for n, _ in named], torch.autograd.grad(loss, [p for _, p in named])))


def last_log(trainer) -> dict:
    return [h for h in trainer.state.log_history if "loss" in h][-1]


# ------------------------------------------------------------ non-finite losses
@pytest.mark.parametrize("method", ["gast", "lora"])
def test_a_nan_sample_is_dropped_from_the_whole_step(method, caplog):
    model = model_with_head()
    before = copy.deepcopy(model)
    full = stack_rows(rows(poisoned=(2,)))
    # Why dropping is needed: the plain batch mean poisons the head (0 × NaN = NaN) and more.
    assert not torch.isfinite(
        dense_grads(before, full)["base_model.model.lm_head.modules_to_save.default.weight"]
    ).all()

    with caplog.at_level(logging.WARNING):
        trainer, calls, seeds = train_recording(model, rows(poisoned=(2,)), method=method)
    # The micro-batch ran, hit the NaN loss before any backward, and was re-run without row 2.
    assert len(calls) == 2 and 2 in calls[0]["index"].tolist()
    kept = calls[1]
    assert sorted(kept["index"].tolist()) == [0, 1, 3]
    assert "non-finite loss" in caplog.text and "dataset rows [2]" in caplog.text
    assert last_log(trainer)["numerics/nonfinite_samples"] == 1

    if method == "gast":
        ref = reference_gast_gradients(before, kept, config(method="gast").gast_settings(), None, seeds[-1])
        names = {id(p): n for n, p in before.named_parameters()}
        expected = {names[k]: g for k, g in ref.items()}
        mask = trainer.method.masks[-1][1]
        assert mask.shape[0] == 3  # the selection ran over the three finite samples only
    else:
        expected = dense_grads(before, kept)
    after = trainable(model)
    assert set(after) == set(expected)
    for name, grad in expected.items():
        assert torch.isfinite(after[name]).all(), name
        torch.testing.assert_close(after[name], before.get_parameter(name) - LR * grad, rtol=1e-5, atol=1e-6)


def test_every_sample_nan_fails_the_run_by_default():
    model = model_with_head()
    before = trainable(model)
    with pytest.raises(TrainingFailed, match=r"step 1 trained on no sample.*max_skipped_steps=0"):
        train_recording(model, rows(poisoned=(0, 1, 2, 3)), method="gast")
    assert all(torch.equal(p, before[n]) for n, p in trainable(model).items())


def test_a_run_whose_every_step_was_skipped_fails_whatever_the_allowance():
    model = model_with_head()
    with pytest.raises(TrainingFailed, match="all 1 steps trained on no sample"):
        train_recording(model, rows(poisoned=(0, 1, 2, 3)), method="gast", max_skipped_steps=5)


@pytest.mark.parametrize("method", ["gast", "lora"])
def test_max_skipped_steps_tolerates_a_skipped_step_and_logs_it_without_a_loss(method):
    """Rows 0-3 (step 1, sequential order) are all NaN, rows 4-7 (step 2) are clean."""
    model = model_with_head()
    data = rows(n=8, poisoned=(0, 1, 2, 3))
    trainer, calls, _ = train_recording(
        model, data, method=method, max_skipped_steps=1, max_steps=2, train_sampling_strategy="sequential"
    )
    step1, step2 = [h for h in trainer.state.log_history if "numerics/skipped_steps" in h]
    assert step1["numerics/skipped_steps"] == 1 and "loss" not in step1  # never a loss of 0
    assert step2["numerics/skipped_steps"] == 0 and step2["loss"] > 0
    # the run's train_loss is the mean over the step that trained, not halved by the skipped one
    final = trainer.state.log_history[-1]
    assert final["train_loss"] == pytest.approx(step2["loss"], rel=1e-3)
    assert sorted(calls[-1]["index"].tolist()) == [4, 5, 6, 7]


def test_a_nan_gradient_with_a_finite_loss_is_never_selected():
    """Row 1's gradient turns NaN on its way back through the top block (its loss is fine):
    GAST gives it a NaN score in every block, never picks it, and counts it."""
    model = model_with_head(poison=False)
    bad_row = 1
    blocks = model.base_model.model.model.layers

    def inject(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad and hidden.shape[0] == 4:  # the training pass, not the support pass

            def to_nan(grad):
                grad = grad.clone()
                grad[bad_row] = float("nan")
                return grad

            hidden.register_hook(to_nan)

    blocks[-1].register_forward_hook(inject)
    trainer, _, _ = train_recording(
        model, rows(), method="gast", gast_support="train", gast_support_size=3, max_steps=3
    )
    for _, mask in trainer.method.masks:
        assert not mask[bad_row].any(), "the NaN-gradient sample was selected"
        assert (mask.sum(dim=0) == 2).all()  # the other three still fill k = 2 per block
    assert sum(h["numerics/nonfinite_grad_samples"] for h in trainer.state.log_history if "loss" in h) == 3
    assert all(torch.isfinite(p).all() for n, p in trainable(model).items() if ".layers." in n)


# ------------------------------------------------------------ samples with no target token
def test_samples_without_targets_are_never_drawn_by_the_engine():
    """Their gradient is exactly zero (score 0, a middling score that softmax sampling would
    draw ahead of negatively aligned real samples): the engine itself never selects them,
    even when it is used without the trainer, which also drops them before the step."""
    model = model_with_head(poison=False)
    batch = stack_rows(rows(n=6, no_target=(4,)))
    engine = GastEngine(model, GastSettings(k=3)).attach()
    for seed in range(10):
        with engine.step(6, None, seed):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            per_sample_loss(out.logits, batch["labels"]).mean().backward()
        assert all(math.isnan(r.scores[4]) for r in engine.records)
        assert all(4 not in r.chosen and len(r.chosen) == 3 for r in engine.records)
    engine.detach()


def test_samples_without_targets_are_skipped_by_the_trainer(caplog):
    model = model_with_head(poison=False)
    before = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING):
        trainer, calls, seeds = train_recording(model, rows(no_target=(0,)), method="gast")
    assert len(calls) == 1 and sorted(calls[0]["index"].tolist()) == [1, 2, 3]
    assert "no target token (dataset rows [0])" in caplog.text
    assert last_log(trainer)["numerics/no_target_samples"] == 1
    # k=2 of a 4-row batch keeps its share of the 3 rows left: round(2·3/4) = 2.
    assert (trainer.method.masks[-1][1].sum(dim=0) == 2).all()
    ref = reference_gast_gradients(before, calls[0], config().gast_settings(), None, seeds[0])
    names = {id(p): n for n, p in before.named_parameters()}
    for key, grad in ref.items():
        name = names[key]
        expected = before.get_parameter(name) - LR * grad
        torch.testing.assert_close(model.get_parameter(name), expected, rtol=1e-5, atol=1e-6)


def test_a_batch_with_no_target_at_all_trains_nothing_and_is_a_skipped_step():
    model = model_with_head(poison=False)
    before = trainable(model)
    calls = []
    with pytest.raises(TrainingFailed, match="step 1 trained on no sample"):
        train_recording(model, rows(no_target=(0, 1, 2, 3)), method="gast", calls=calls)
    assert len(calls) == 1 and calls[0]["input_ids"].shape[0] == 4  # nothing better to keep
    assert all(torch.equal(p, before[n]) for n, p in trainable(model).items())


# ------------------------------------------------------------ selection edge cases (engine)
def engine_step(model, batch, k, support_batch=None, seed=3):
    engine = GastEngine(model, GastSettings(k=k)).attach()
    support = (
        None if support_batch is None else support_gradients(model, support_batch, engine.block_parameters)
    )
    model.zero_grad(set_to_none=True)
    n = batch["input_ids"].shape[0]
    with engine.step(n, support, seed):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        per_sample_loss(out.logits, batch["labels"]).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    records = engine.records
    engine.detach()
    return grads, records


def test_zero_support_gradient_falls_back_to_the_batch_direction_not_a_uniform_draw():
    model = model_with_head(poison=False)
    support = make_batch(n=2, seed=9)
    support["labels"][:] = -100  # no target: the support gradient is exactly zero
    batch = make_batch(n=6, seed=1)
    grads, records = engine_step(model, batch, k=3, support_batch=support)
    assert all(r.support_fallback and len(r.chosen) == 3 for r in records)
    assert all(len(set(r.scores)) > 1 for r in records)  # a real ranking, not all-equal scores
    assert all(torch.isfinite(g).all() for g in grads.values())
    # exactly what support=batch (the batch's own mean gradient) chooses and delivers
    batch_grads, batch_records = engine_step(model, batch, k=3)
    assert [r.chosen for r in records] == [r.chosen for r in batch_records]
    for name, g in grads.items():
        assert torch.equal(g, batch_grads[name])


def test_a_single_sample_batch_with_k_1_is_its_own_gradient():
    model = model_with_head(poison=False)
    batch = make_batch(n=1, seed=1)
    grads, records = engine_step(model, batch, k=1, support_batch=make_batch(n=2, seed=9))
    assert all(r.chosen == [0] for r in records)
    expected = dense_grads(model, batch)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-7)


def test_k_equal_to_the_batch_is_dense_training():
    model = model_with_head(poison=False)
    batch = make_batch(n=5, seed=1)
    grads, records = engine_step(model, batch, k=5)
    assert all(r.chosen == [0, 1, 2, 3, 4] for r in records)
    expected = dense_grads(model, batch)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-7)


def test_batch_of_one_and_k_equal_n_through_the_trainer():
    for batch_size, k in [(1, 1), (4, 4)]:
        model = model_with_head(poison=False)
        before = copy.deepcopy(model)
        _, calls, _ = train_recording(
            model, rows(), method="gast", per_device_train_batch_size=batch_size, gast_k=k
        )
        expected = dense_grads(before, calls[0])  # every sample selected = the plain mean
        for name, grad in expected.items():
            torch.testing.assert_close(
                model.get_parameter(name), before.get_parameter(name) - LR * grad, rtol=1e-5, atol=1e-6
            )


def test_a_nan_sample_inside_a_methods_subset_is_matched_by_identity():
    """random-half trains on a subset of the micro-batch, so the forward that meets the NaN
    sample sees it at an earlier position than the micro-batch has it: the row dropped must
    be the poisoned one (dataset row 3), not whatever sits at its subset position."""
    for seed in range(20):  # the first seed whose draw keeps row 3 but not a row before it
        model = model_with_head()
        trainer, calls, _ = train_recording(
            model, rows(poisoned=(3,)), method="random-half", select_fraction=0.75, seed=seed
        )
        position = calls[0]["index"].tolist().index(3)
        kept = trainer.method.masks[0][1].any(dim=1)  # positions trained in the first attempt
        if kept[position] and not kept[:position].all():
            break
    else:
        pytest.fail("no seed put the poisoned row at a shifted position")
    assert len(calls) == 2 and sorted(calls[1]["index"].tolist()) == [0, 1, 2]
    assert last_log(trainer)["numerics/nonfinite_samples"] == 1
    assert all(torch.isfinite(p).all() for p in trainable(model).values())

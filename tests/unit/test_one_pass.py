"""GAST's one-pass support (support rows ride in the batch's forward/backward) against the
two-pass path: the same support rows give the same selections and the same update."""

from __future__ import annotations

import pytest
import torch

from gastune.methods.rows import join_rows
from gastune.training import GastuneTrainer
from tests.conftest import make_batch
from tests.helpers import RecordingCollator, lora_model, row_dataset, trainable
from tests.helpers import sgd_config as config


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def heldout_rows(n: int = 6, t: int = 5) -> list[dict[str, torch.Tensor]]:
    """Support rows shorter than the training rows, so the one-pass batch needs padding."""
    data = make_batch(n=n, t=t, seed=11)
    return [{**{k: v[i] for k, v in data.items()}, "index": torch.tensor(100 + i)} for i in range(n)]


def train(support_pass: str, tuner: str = "lora", support: str = "heldout", steps: int = 2, **extra):
    model = lora_model(layers=3, tuner=tuner)
    forwards = []
    model.register_forward_pre_hook(lambda m, a, kw: forwards.append(kw["input_ids"].shape), with_kwargs=True)
    trainer = GastuneTrainer(
        model=model,
        args=config(
            method="gast",
            gast_k=2,
            gast_support_size=3,
            gast_support=support,
            gast_support_pass=support_pass,
            max_steps=steps,
            **extra,
        ),
        train_dataset=row_dataset(8),
        support_dataset=heldout_rows() if support == "heldout" else None,
        data_collator=RecordingCollator(),
    )
    before = trainable(model)
    records = []
    step = trainer.method.training_step

    def recording(trainer_, model_, inputs, run):
        loss = step(trainer_, model_, inputs, run)
        records.append([(r.group, r.chosen) for r in trainer.method.engine.records])
        return loss

    trainer.method.training_step = recording
    trainer.train()
    return before, trainable(model), records, forwards, trainer.state.log_history


@pytest.mark.parametrize("tuner", ["lora", "dora"])
@pytest.mark.parametrize("support", ["heldout", "train"])
def test_one_pass_equals_two_pass(tuner, support):
    before, two, records_two, forwards_two, _ = train("two", tuner, support)
    before_one, one, records_one, forwards_one, log = train("one", tuner, support)
    assert records_one == records_two and len(records_one) == 2
    for name in two:
        torch.testing.assert_close(before_one[name], before[name])
        assert not torch.equal(two[name], before[name]), name  # the step trained every adapter
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-6)
    # one pass: one forward of 4 + 3 rows per step; two: a support forward of 3, then 4 rows
    assert [s[0] for s in forwards_one] == [7, 7]
    assert [s[0] for s in forwards_two] == [3, 4, 3, 4]
    assert all(e["loss"] > 0 for e in log if "loss" in e)


def test_one_pass_under_gradient_checkpointing_equals_two_pass():
    before, two, records_two, *_ = train("two")
    _, one, records_one, *_ = train(
        "one", gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    assert records_one == records_two
    for name in two:
        assert not torch.equal(two[name], before[name]), name
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-6)


def test_one_pass_reports_the_training_rows_loss():
    *_, log_two = train("two", steps=1)
    *_, log_one = train("one", steps=1)
    loss_two = next(e["loss"] for e in log_two if "loss" in e)
    loss_one = next(e["loss"] for e in log_one if "loss" in e)
    assert loss_one == pytest.approx(loss_two, rel=1e-5)


def test_join_rows_pads_right_and_keeps_the_rows():
    a, b = make_batch(n=2, t=6), make_batch(n=3, t=4, seed=5)
    joined = join_rows(a, b)
    assert joined["input_ids"].shape == (5, 6)
    assert torch.equal(joined["input_ids"][:2], a["input_ids"])
    assert torch.equal(joined["input_ids"][2:, :4], b["input_ids"])
    assert (joined["attention_mask"][2:, 4:] == 0).all() and (joined["labels"][2:, 4:] == -100).all()

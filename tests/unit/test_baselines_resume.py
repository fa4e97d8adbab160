"""Resuming a baseline from a checkpoint reproduces the uninterrupted run: same layer choices
(LISA mid-interval, IST scores and probe batches, Fisher's fixed choice without re-scoring),
same row choices, bit-identical parameters.

Runs: 6 optimizer steps (AdamW, lr warm-up and decay) of a 4-layer tiny Llama + LoRA,
checkpoints every 3 steps; IST probes at steps 2 and 4, LISA re-draws at 0, 2, 4.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.unit._baseline_helpers import Collator, dataset, lora_model, trainable, trainer_for

RUN = dict(
    max_steps=6,
    save_strategy="steps",
    save_steps=3,
    optim="adamw_torch",
    learning_rate=1e-2,
    warmup_steps=2,
    lr_scheduler_type="linear",
    ist_interval=2,
    ist_probe_batch=5,
    lisa_layers=1,
    lisa_interval=2,
    fisher_samples=3,
    gast_k=2,
    gast_support_size=2,
)


def run(out: Path, method: str, resume=None):
    trainer = trainer_for(
        method, model=lora_model(), data=dataset(), collator=Collator(), output_dir=str(out), **RUN
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, trainable(trainer.model)


@pytest.mark.parametrize("method", ["ist", "lisa", "fisher", "random-half"])
def test_resume_reproduces_the_uninterrupted_run(method, tmp_path):
    reference, params = run(tmp_path / "full", method)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed, resumed_params = run(resumed_dir, method, resume=str(resumed_dir / "checkpoint-3"))
    assert resumed_params.keys() == params.keys()
    for name, value in params.items():
        assert torch.equal(resumed_params[name], value), name
    if method == "random-half":
        masks = [(s, m) for s, m in reference.method.masks if s >= 3]
        assert [s for s, _ in resumed.method.masks] == [s for s, _ in masks]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed.method.masks, masks))
        return
    assert resumed.method.history == [h for h in reference.method.history if h[0] >= 3]
    if method == "ist":
        assert [s for s, _, _ in resumed.method.policy.probes] == [4]
        assert torch.equal(resumed.method.policy.scores, reference.method.policy.scores)
    if method == "fisher":
        assert resumed.method.policy.indices == []  # the choice came from the checkpoint

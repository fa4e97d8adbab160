"""Resuming from a checkpoint reproduces the uninterrupted run, and an interrupted save
never leaves a checkpoint that looks complete.

Runs are 6 optimizer steps of a tiny Llama + LoRA (AdamW, lr warm-up and decay, LoRA
dropout on, 16 rows in batches of 4, so step 4 starts a new epoch) saving every 3 steps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from gastune.errors import GastuneError
from gastune.training import METHODS, GastuneConfig, GastuneTrainer
from gastune.training.checkpoint import MANIFEST_NAME, METHOD_STATE_NAME
from tests import helpers
from tests.helpers import row_dataset, stack_rows

STEPS, SAVE = 6, 3


def lora_model() -> torch.nn.Module:
    return helpers.lora_model(layers=2, dropout=0.1)


def config(out: Path, method: str, **overrides) -> GastuneConfig:
    kwargs = dict(
        output_dir=str(out),
        method=method,
        gast_k=2,
        gast_support="train",  # the support draw comes from the method's own generator
        gast_support_size=3,
        use_cpu=True,
        report_to="none",
        save_strategy="steps",
        save_steps=SAVE,
        optim="adamw_torch",
        learning_rate=1e-2,
        warmup_steps=2,
        lr_scheduler_type="linear",
        per_device_train_batch_size=4,
        dataloader_drop_last=True,
        remove_unused_columns=False,
        max_steps=STEPS,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    return GastuneConfig(**{**kwargs, **overrides})


def run(out: Path, method: str, resume=None, **overrides) -> tuple[GastuneTrainer, dict, list]:
    """Train (or resume) and return the trainer, final trainable parameters and the GAST
    selection masks by global step."""
    model = lora_model()
    trainer = GastuneTrainer(
        model=model,
        args=config(out, method, **overrides),
        train_dataset=row_dataset(),
        data_collator=stack_rows,
    )
    trainer.train(resume_from_checkpoint=resume)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    masks = [(step, mask.clone()) for step, mask in getattr(trainer.method, "masks", [])]
    return trainer, params, masks


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit-identical, not just close


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The reference 6-step runs, one per method, with their checkpoints."""
    runs = {}
    for method in ("gast", "lora"):
        out = tmp_path_factory.mktemp(method)
        _, params, masks = run(out, method)
        runs[method] = (out, params, masks)
    return runs


@pytest.mark.parametrize("method", ["gast", "lora"])
def test_resume_from_step_3_reproduces_the_uninterrupted_run(method, uninterrupted, tmp_path):
    out, params, masks = uninterrupted[method]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    state_files = list((out / "checkpoint-3").glob(f"{METHOD_STATE_NAME}*"))
    assert len(state_files) == (1 if method == "gast" else 0)  # dense LoRA has no method state

    resumed_out = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-3", resumed_out / "checkpoint-3")
    _, resumed, resumed_masks = run(resumed_out, method, resume=str(resumed_out / "checkpoint-3"))
    assert_same_params(resumed, params)
    if method == "gast":
        # The resumed run made exactly the uninterrupted run's selections in steps 3, 4, 5.
        assert [s for s, _ in resumed_masks] == [3, 4, 5]
        for (step, mask), (_, expected) in zip(resumed_masks, masks[3:]):
            assert torch.equal(mask, expected), f"step {step} selected differently"


def test_without_the_method_state_gast_does_not_reproduce(uninterrupted, tmp_path, caplog):
    out, params, masks = uninterrupted["gast"]
    stripped = tmp_path / "stripped"
    shutil.copytree(out / "checkpoint-3", stripped / "checkpoint-3")
    for f in (stripped / "checkpoint-3").glob(f"{METHOD_STATE_NAME}*"):
        f.unlink()
    # The manifest lists the method state, so the checkpoint is refused as incomplete…
    with pytest.raises(GastuneError, match=f"damaged: {METHOD_STATE_NAME}.pt is missing"):
        run(stripped, "gast", resume=str(stripped / "checkpoint-3"))
    # …and a checkpoint without a manifest (older, or made by a plain Trainer) resumes with a warning.
    (stripped / "checkpoint-3" / MANIFEST_NAME).unlink()
    _, resumed, resumed_masks = run(stripped, "gast", resume=str(stripped / "checkpoint-3"))
    assert "holds no state for method gast" in caplog.text
    # The generators restart from their seeds: different support draws and selections…
    assert any(not torch.equal(m, e) for (_, m), (_, e) in zip(resumed_masks, masks[3:]))
    # …so the parameters end elsewhere (what the test above would catch).
    assert any(not torch.allclose(resumed[n], params[n], atol=1e-6) for n in params)


class CrashOnSecondSave:
    """Makes the Trainer's RNG-state save raise at step 6: mid-checkpoint, after the adapter
    and optimizer files of checkpoint-6 are already written."""

    def __init__(self, trainer):
        self.original = trainer._save_rng_state
        trainer._save_rng_state = self

    def __call__(self, output_dir):
        if output_dir.endswith(f"checkpoint-{STEPS}"):
            raise OSError("disk full (simulated)")
        return self.original(output_dir)


def test_an_interrupted_save_leaves_the_last_good_checkpoint(uninterrupted, tmp_path):
    out = tmp_path / "crash"
    trainer = GastuneTrainer(
        model=lora_model(), args=config(out, "gast"), train_dataset=row_dataset(), data_collator=stack_rows
    )
    CrashOnSecondSave(trainer)
    with pytest.raises(OSError, match="simulated"):
        trainer.train()

    # Half of checkpoint-6 was written, but only into the staging folder.
    staged = out / f"tmp-checkpoint-{STEPS}" / f"checkpoint-{STEPS}"
    assert (staged / "adapter_model.safetensors").is_file() and (staged / "optimizer.pt").is_file()
    assert not (out / f"checkpoint-{STEPS}").exists()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-3")

    # resume_from_checkpoint=True picks checkpoint-3 and reproduces the uninterrupted run;
    # its own save of checkpoint-6 clears the stale staging folder.
    _, params, _ = run(out, "gast", resume=True)
    assert_same_params(params, uninterrupted["gast"][1])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-6"]


def test_plain_trainer_would_leave_a_complete_looking_checkpoint(tmp_path):
    """Why the staging exists: transformers' own Trainer writes checkpoint-6 in place."""
    out = tmp_path / "plain"
    args = config(out, "lora", max_steps=STEPS)
    model = lora_model()
    trainer = Trainer(model=model, args=args, train_dataset=row_dataset(), data_collator=stack_rows)
    CrashOnSecondSave(trainer)
    with pytest.raises(OSError, match="simulated"):
        trainer.train()
    assert get_last_checkpoint(str(out)) == str(out / f"checkpoint-{STEPS}")
    assert not (out / f"checkpoint-{STEPS}" / "rng_state.pth").exists()


def test_rotation_and_best_checkpoint_point_at_published_folders(tmp_path):
    out = tmp_path / "rot"
    trainer, _, _ = run(out, "gast", save_total_limit=1)
    assert sorted(p.name for p in out.iterdir()) == [f"checkpoint-{STEPS}"]
    assert not any("tmp-" in str(p) for p in out.rglob("*"))
    assert trainer.state.best_model_checkpoint is None  # no eval metric: nothing to track


def test_resume_values_from_the_command_line(uninterrupted, tmp_path):
    from gastune.training.checkpoint import resolve_resume

    out = uninterrupted["gast"][0]
    for value in ("true", "last", True):
        assert resolve_resume(value, out) == str(out / "checkpoint-6")
    assert resolve_resume(None, out) is None and resolve_resume("false", out) is None
    assert resolve_resume(str(out / "checkpoint-3"), out) == str(out / "checkpoint-3")
    with pytest.raises(GastuneError, match="no checkpoint-N folder"):
        resolve_resume("true", tmp_path)
    with pytest.raises(GastuneError, match="does not exist"):
        resolve_resume(str(tmp_path / "nope"), out)


# Small probe/sample sizes so every method's scoring runs inside the 6 steps.
BASELINE_OPTIONS = dict(
    ist_interval=2, ist_probe_batch=4, lisa_interval=2, fisher_samples=4, greats_val_size=2
)


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"gast", "lora"}))
def test_every_method_resumes_exactly(method, tmp_path):
    """Each registered method's state_dict() round-trips through the checkpoint (loaded with
    weights_only=True) and the resumed run is bit-identical to the uninterrupted one."""
    _, params, _ = run(tmp_path / "full", method, **BASELINE_OPTIONS)
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    checkpoint = str(tmp_path / "resumed" / "checkpoint-3")
    _, resumed, _ = run(tmp_path / "resumed", method, resume=checkpoint, **BASELINE_OPTIONS)
    assert_same_params(resumed, params)

"""One GAST optimizer step under 2-process CPU DDP (gloo); launched by ``test_distributed.py``.

Run: ``python -m torch.distributed.run --nproc_per_node=2 tests/unit/_ddp_worker.py OUTDIR``

Each rank records what it trained on (micro-batch, step seed, support batch), the gradient
the optimizer saw (after DDP's all-reduce), its final parameters, and the slow reference
GAST gradient of its own micro-batch on a copy of the initial model; it saves them to
``OUTDIR/rank{r}.pt`` for the test to compare across ranks.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

# The script runs as a file, so the repository root (for ``tests.conftest``) is not on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from peft import get_peft_model
from transformers import TrainerCallback

from gastune.engine.gast import GastEngine
from gastune.engine.reference import reference_gast_gradients
from gastune.training import GastuneConfig, GastuneTrainer
from gastune.training.adapters import build_peft_config
from tests.conftest import make_batch, tiny_model

LR = 0.5
BATCH, K, K_SUP = 4, 2, 3


def collate(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([f[key] for f in features]) for key in features[0]}


class GradSpy(TrainerCallback):
    """Keeps the gradient the optimizer is about to use (i.e. after DDP's all-reduce)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.grads = model, {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def main(outdir: str) -> None:
    # Identical on both ranks: the model and its adapter are built from the same seed.
    model = tiny_model("llama", layers=2)
    peft_cfg = build_peft_config(model, r=2, alpha=4, dropout=0.0)
    peft_cfg.init_lora_weights = False  # non-zero B: every adapter tensor gets a gradient
    model = get_peft_model(model, peft_cfg)
    initial = copy.deepcopy(model)
    data = make_batch(n=16, t=8, seed=3)
    dataset = [{**{k: v[i] for k, v in data.items()}, "index": torch.tensor(i)} for i in range(16)]

    args = GastuneConfig(
        output_dir=os.path.join(outdir, "run"),
        method="gast",
        gast_k=K,
        gast_support_size=K_SUP,
        gast_support="train",
        use_cpu=True,
        ddp_backend="gloo",
        report_to="none",
        save_strategy="no",
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        learning_rate=LR,
        per_device_train_batch_size=BATCH,
        dataloader_drop_last=True,
        remove_unused_columns=False,  # keep "index" (the mixin drops it before the model)
        max_steps=1,
        disable_tqdm=True,
    )
    spy = GradSpy(model)
    trainer = GastuneTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[spy]
    )
    seen: dict[str, list] = {"inputs": [], "support": [], "seeds": [], "masks": []}
    method = trainer.method
    step, support_batch = method.training_step, method._support_batch

    def recording_step(trainer_, model_, inputs, run):
        seen["inputs"].append({k: v.clone() for k, v in inputs.items()})
        return step(trainer_, model_, inputs, run)

    def recording_support(trainer_):
        batch = support_batch(trainer_)
        seen["support"].append({k: v.clone() for k, v in batch.items()})
        return batch

    engine_step = GastEngine.step

    def recording_engine_step(self, batch_size, support=None, step_seed=0, **kwargs):
        seen["seeds"].append(step_seed)
        return engine_step(self, batch_size, support, step_seed, **kwargs)

    method.training_step, method._support_batch = recording_step, recording_support
    GastEngine.step = recording_engine_step
    trainer.train()

    rank, world = trainer.args.process_index, trainer.args.world_size
    (batch,), (support,), (seed,) = seen["inputs"], seen["support"], seen["seeds"]
    ref = reference_gast_gradients(initial, batch, args.gast_settings(), support, seed)
    names = {id(p): n for n, p in initial.named_parameters()}
    torch.save(
        {
            "rank": rank,
            "world_size": world,
            "lr": LR,
            "ddp": type(trainer.model_wrapped).__name__,
            "index": batch["index"],
            "support_index": support["index"],
            "seed": seed,
            "mask": method.masks[-1][1],
            "initial": {n: p.detach().clone() for n, p in initial.named_parameters() if p.requires_grad},
            "final": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer_grad": spy.grads,
            "reference_grad": {names[key]: g for key, g in ref.items()},
        },
        os.path.join(outdir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])

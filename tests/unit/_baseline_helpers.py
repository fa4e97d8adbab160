"""Shared set-up of the baseline tests: tiny LoRA models, row datasets, SGD configs."""

from __future__ import annotations

import re

import torch
from peft import get_peft_model

from gastune.training import GastuneConfig, GastuneTrainer
from gastune.training.adapters import build_peft_config
from tests.conftest import make_batch, tiny_model

LR = 0.5
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def lora_model(layers: int = 4, tuner: str = "lora") -> torch.nn.Module:
    model = tiny_model("llama", layers=layers)
    cfg = build_peft_config(model, tuner=tuner, r=2, alpha=4, dropout=0.0)
    cfg.init_lora_weights = False  # non-zero B, so every adapter tensor has a gradient
    return get_peft_model(model, cfg)


def dataset(n: int = 16, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    data = make_batch(n=n, t=8, seed=seed)
    return [{**{k: v[i] for k, v in data.items()}, "index": torch.tensor(i)} for i in range(n)]


class Collator:
    """Stacks rows; remembers every batch it built, in call order."""

    def __init__(self):
        self.batches: list[dict[str, torch.Tensor]] = []

    def __call__(self, features):
        batch = {k: torch.stack([f[k] for f in features]) for k in features[0]}
        self.batches.append(batch)
        return batch


def config(**overrides) -> GastuneConfig:
    kwargs = dict(
        output_dir="out",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        learning_rate=LR,
        per_device_train_batch_size=4,
        dataloader_drop_last=True,
        remove_unused_columns=False,  # keep "index"; the mixin drops it before the model
        max_steps=1,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    return GastuneConfig(**{**kwargs, **overrides})


def trainer_for(method: str, model=None, data=None, collator=None, callbacks=None, **overrides):
    return GastuneTrainer(
        model=model if model is not None else lora_model(),
        args=config(method=method, **overrides),
        train_dataset=data if data is not None else dataset(),
        data_collator=collator or Collator(),
        callbacks=callbacks,
    )


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def layer_of(name: str) -> int:
    return int(_LAYER.search(name).group(1))


def loss_grads(model, batch, rows=None) -> dict[str, torch.Tensor]:
    """∇ of the mean (over ``rows``, default all) of per-sample losses, per trainable name."""
    from gastune.engine import per_sample_loss

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    losses = per_sample_loss(out.logits, batch["labels"])
    if rows is not None:
        losses = losses[rows]
    grads = torch.autograd.grad(losses.mean(), [p for _, p in named], allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(named, grads)}

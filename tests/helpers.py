"""Set-up shared by the trainer-level tests: tiny LoRA models, row datasets, exact-update configs.

``sgd_config`` makes one optimizer step move each parameter by exactly −lr × its gradient
(SGD, constant lr, no clipping, no weight decay), so tests can compare parameters with a
reference gradient.
"""

from __future__ import annotations

import torch
from peft import get_peft_model

from gastune.training import GastuneConfig
from gastune.training.adapters import build_peft_config
from tests.conftest import make_batch, tiny_model

LR = 0.5


def lora_model(layers: int = 2, tuner: str = "lora", dropout: float = 0.0) -> torch.nn.Module:
    model = tiny_model("llama", layers=layers)
    cfg = build_peft_config(model, tuner=tuner, r=2, alpha=4, dropout=dropout)
    cfg.init_lora_weights = False  # non-zero B, so every adapter tensor has a gradient
    return get_peft_model(model, cfg)


def row_dataset(n: int = 16, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """Rows of a padded batch, each carrying its ``index`` so a test can tell which were used."""
    data = make_batch(n=n, t=8, seed=seed)
    return [{**{k: v[i] for k, v in data.items()}, "index": torch.tensor(i)} for i in range(n)]


def stack_rows(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([f[k] for f in features]) for k in features[0]}


class RecordingCollator:
    """Stacks rows; remembers every batch it built, in call order."""

    def __init__(self):
        self.batches: list[dict[str, torch.Tensor]] = []

    def __call__(self, features):
        batch = stack_rows(features)
        self.batches.append(batch)
        return batch


def sgd_config(**overrides) -> GastuneConfig:
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


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

"""Set-up shared by the trainer-level tests: tiny LoRA models, row datasets, exact-update configs,
and the ``accelerate launch`` recipes of docs/distributed.md.

``sgd_config`` makes one optimizer step move each parameter by exactly −lr × its gradient
(SGD, constant lr, no clipping, no weight decay), so tests can compare parameters with a
reference gradient.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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


# ------------------------------------------------------------ accelerate launch, 2 CPU ranks
REPO = Path(__file__).resolve().parents[1]
POISON_WORDS = " Zebra quagga"  # save_tiny_llama(poison_words=...) gives these tokens a NaN loss


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_data(path: Path, poison: bool = False) -> Path:
    """16 records: with batch 4 per rank on 2 ranks, 2 optimizer steps are one epoch. With
    ``poison``, records 5 (on one rank) and 12 (on the other) hold ``POISON_WORDS``."""
    records = [{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}."} for i in range(16)]
    if poison:
        records[5]["prompt"] = f"What is{POISON_WORDS}?"
        records[12]["completion"] = f"{POISON_WORDS}."
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def recipe_train_args(model: Path, data: Path, out: Path, method: str = "gast") -> list[str]:
    """The ``gastune train`` flags of the recipe tests: 2 steps, batch 4 per rank, checkpoint at
    step 2. Flags given after these override them (the parser keeps the last value)."""
    gast = ("--gast_k", "2", "--gast_support", "batch") if method.startswith("gast") else ()
    return [
        *("--use_cpu", "true", "--model", str(model), "--data", str(data), "--method", method, *gast),
        *("--per_device_train_batch_size", "4", "--max_steps", "2", "--save_steps", "2"),
        *("--lora_r", "2", "--lora_alpha", "4", "--output_dir", str(out), "--report_to", "none"),
        *("--seed", "0", "--dataloader_drop_last", "true", "--disable_tqdm", "true"),
    ]


def accelerate_launch(
    config_file: Path,
    entry: list[str],
    train_args: list[str],
    cwd: Path,
    timeout: float,
    env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """``accelerate launch --config_file CONFIG ENTRY train ARGS`` on the CPU, one thread per
    process; ``entry`` is ``["-m", "gastune.cli.main"]`` or a script. Exit code and the log."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *("--config_file", str(config_file), "--main_process_port", str(free_port())),
        *entry,
        "train",
        *train_args,
    ]
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        **(env or {}),
    }
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def record_reference_choices(monkeypatch) -> list[list[int]]:
    """Make ``engine/reference.py`` record the samples it chooses for each group, in order."""
    import gastune.engine.reference as reference

    chosen: list[list[int]] = []
    choose = reference.choose_samples

    def recording_choose(*args, **kwargs):
        picked = choose(*args, **kwargs)
        chosen.append(picked.tolist())
        return picked

    monkeypatch.setattr(reference, "choose_samples", recording_choose)
    return chosen


def short_run(output_dir, method: str) -> GastuneConfig:
    """8 steps of 4 rows at a constant learning rate, on the CPU."""
    return GastuneConfig(
        output_dir=str(output_dir),
        method=method,
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        gast_k=2,
        gast_support_size=2,
        use_cpu=True,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )

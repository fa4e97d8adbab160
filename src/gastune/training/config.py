"""Configuration dataclasses: one set drives the Python API, the CLI and YAML files.

``GastuneConfig`` extends transformers' ``TrainingArguments``, so every Trainer flag works;
``ModelConfig`` and ``DataConfig`` describe what to train on.
"""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from gastune.engine.settings import GastSettings
from gastune.errors import GastuneError
from gastune.models.loading import DEFAULT_MODEL
from gastune.training.adapters import TUNERS


@dataclass
class ModelConfig:
    """The base model and its adapter."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "HF model path/folder, or 'smollm2-135m'."})
    tuner: str | None = field(
        default=None,
        metadata={"help": f"Adapter type: {', '.join(TUNERS)} (default: lora; dora for --method dora)."},
    )
    lora_r: int = field(default=32, metadata={"help": "Adapter rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input."})
    target_modules: str = field(
        default="auto",
        metadata={"help": "Comma-separated module names, or 'auto' (q,k,v,up,down when present)."},
    )

    def __post_init__(self) -> None:
        if self.tuner is not None and self.tuner not in TUNERS:
            raise GastuneError(f"unknown tuner '{self.tuner}'; choose one of {', '.join(TUNERS)}")
        if self.lora_r < 1:
            raise GastuneError(f"lora_r must be ≥ 1, got {self.lora_r}")


@dataclass
class DataConfig:
    """Training data: the built-in commonsense mixture or a user file/folder."""

    data: str = field(
        default="commonsense",
        metadata={"help": "'commonsense' (the 8-task mixture) or a .json/.jsonl file or saved HF dataset."},
    )
    per_task: int | None = field(
        default=None, metadata={"help": "Commonsense: examples per task (default: all)."}
    )
    tasks: str | None = field(
        default=None, metadata={"help": "Commonsense: comma-separated subset of tasks."}
    )
    data_seed_value: int = field(default=0, metadata={"help": "Seed for sub-sampling the data."})
    cutoff_len: int = field(default=256, metadata={"help": "Truncate sequences to this many tokens."})
    train_on_prompt: bool = field(
        default=True, metadata={"help": "Loss over prompt + answer (False: answer only)."}
    )
    support_data: str | None = field(
        default=None,
        metadata={"help": "GAST held-out support set (file/folder or 'commonsense-validation')."},
    )


@dataclass
class GastuneConfig(TrainingArguments):
    """TrainingArguments plus the sparse-tuning method and its settings."""

    method: str = field(
        default="lora", metadata={"help": "Training method: lora, dora, gast, ... (see docs)."}
    )
    gast_k: float = field(
        default=0.5, metadata={"help": "GAST: samples kept per layer (count, or fraction < 1)."}
    )
    gast_support_size: int = field(default=4, metadata={"help": "GAST: support samples per step (K_sup)."})
    gast_support: str = field(
        default="train", metadata={"help": "GAST support source: train (fresh draw), heldout, or batch."}
    )
    gast_selection: str = field(default="softmax", metadata={"help": "GAST: softmax, random or topk."})
    gast_score: str = field(default="dot", metadata={"help": "GAST: dot or cosine alignment."})
    gast_temperature: float = field(default=1.0, metadata={"help": "GAST: softmax temperature τ."})
    gast_granularity: str = field(default="block", metadata={"help": "GAST: block or module."})
    output_dir: str = field(
        default="runs/gastune", metadata={"help": "Where checkpoints and the adapter go."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from gastune.training.methods import METHODS

        if self.method not in METHODS:
            raise GastuneError(f"unknown method '{self.method}'; choose one of {', '.join(sorted(METHODS))}")
        if self.gast_support not in ("train", "heldout", "batch"):
            raise GastuneError(f"gast_support must be train, heldout or batch, got '{self.gast_support}'")
        if self.gast_support_size < 1:
            raise GastuneError(f"gast_support_size (K_sup) must be ≥ 1, got {self.gast_support_size}")
        self.gast_settings()  # validates k, selection, score, τ, granularity
        k = self.gast_k
        if self.method.startswith("gast") and k >= 1 and int(k) > self.per_device_train_batch_size:
            raise GastuneError(f"gast_k={int(k)} exceeds the batch size {self.per_device_train_batch_size}")

    def gast_settings(self) -> GastSettings:
        return GastSettings(
            k=self.gast_k,
            selection=self.gast_selection,
            score=self.gast_score,
            temperature=self.gast_temperature,
            granularity=self.gast_granularity,
        )

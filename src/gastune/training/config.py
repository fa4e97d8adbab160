"""Configuration dataclasses: one set drives the Python API, the CLI and YAML files.

``GastuneConfig`` extends transformers' ``TrainingArguments``, so every Trainer flag works;
``ModelConfig`` and ``DataConfig`` describe what to train on.
"""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from gastune.engine.settings import GastSettings
from gastune.errors import GastuneError
from gastune.methods import METHODS
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
    prompt_format: str = field(
        default="mc",
        metadata={
            "help": "Commonsense: 'mc' (LLM-Adapters, numbered choices, answer = label) or "
            "'rc' (question only, answer = the option's text)."
        },
    )
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
    # Baselines (docs/methods.md): IST, RST, LISA, Fisher layers, online data selection.
    ist_layer_fraction: float = field(
        default=0.25, metadata={"help": "IST: share of decoder layers trained per step (int(f·L), ≥ 1)."}
    )
    ist_interval: int = field(default=10, metadata={"help": "IST: optimizer steps between score probes."})
    ist_probe_batch: int = field(default=16, metadata={"help": "IST: training rows in a probe batch."})
    ist_probe_sets: int = field(default=3, metadata={"help": "IST: suppressed layer sets per probe."})
    ist_probe_fraction: float = field(
        default=0.5, metadata={"help": "IST: share of layers suppressed in each probe set."}
    )
    ist_suppression: float = field(
        default=0.25, metadata={"help": "IST: adapter output scale of suppressed layers (> 0)."}
    )
    ist_score_lr: float = field(default=10.0, metadata={"help": "IST: step size of the score update."})
    rst_layer_fraction: float = field(
        default=0.25, metadata={"help": "RST: share of decoder layers drawn uniformly per step."}
    )
    lisa_layers: int = field(default=2, metadata={"help": "LISA: layers trained at a time (γ)."})
    lisa_interval: int = field(default=20, metadata={"help": "LISA: optimizer steps between re-draws (K)."})
    lisa_keep_outside: bool = field(
        default=True,
        metadata={
            "help": "LISA: keep trainable parameters outside decoder layers (embeddings/head) training."
        },
    )
    fisher_layers: float = field(
        default=0.25, metadata={"help": "Fisher: layers trained (count, or fraction < 1 of the layers)."}
    )
    fisher_samples: int = field(default=100, metadata={"help": "Fisher: training examples scored."})
    select_fraction: float = field(
        default=0.5, metadata={"help": "maxloss/gradnorm/greats/random-half: share of each batch kept."}
    )
    greats_val_size: int = field(default=2, metadata={"help": "GREATS: validation rows per step."})
    greats_val: str = field(
        default="train", metadata={"help": "GREATS validation source: train (fresh draw) or heldout."}
    )
    greats_lr: float | None = field(
        default=None, metadata={"help": "GREATS: lr in its utility (default: the step's learning rate)."}
    )
    output_dir: str = field(
        default="runs/gastune", metadata={"help": "Where checkpoints and the adapter go."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise GastuneError(f"unknown method '{self.method}'; choose one of {', '.join(sorted(METHODS))}")
        if self.gast_support not in ("train", "heldout", "batch"):
            raise GastuneError(f"gast_support must be train, heldout or batch, got '{self.gast_support}'")
        if self.gast_support_size < 1:
            raise GastuneError(f"gast_support_size (K_sup) must be ≥ 1, got {self.gast_support_size}")
        self.gast_settings()  # validates k, selection, score, τ, granularity
        self._check_baselines()
        k = self.gast_k
        if self.method.startswith("gast") and k >= 1 and int(k) > self.per_device_train_batch_size:
            raise GastuneError(f"gast_k={int(k)} exceeds the batch size {self.per_device_train_batch_size}")

    def _check_baselines(self) -> None:
        fractions = {
            "ist_layer_fraction": self.ist_layer_fraction,
            "ist_probe_fraction": self.ist_probe_fraction,
            "rst_layer_fraction": self.rst_layer_fraction,
            "select_fraction": self.select_fraction,
        }
        for name, value in fractions.items():
            if not 0 < value <= 1:
                raise GastuneError(f"{name} must be in (0, 1], got {value}")
        counts = {
            "ist_interval": self.ist_interval,
            "ist_probe_batch": self.ist_probe_batch,
            "ist_probe_sets": self.ist_probe_sets,
            "lisa_layers": self.lisa_layers,
            "lisa_interval": self.lisa_interval,
            "fisher_samples": self.fisher_samples,
            "greats_val_size": self.greats_val_size,
        }
        for name, value in counts.items():
            if value < 1:
                raise GastuneError(f"{name} must be ≥ 1, got {value}")
        if not self.ist_suppression > 0:
            raise GastuneError(f"ist_suppression must be > 0, got {self.ist_suppression}")
        if self.fisher_layers <= 0 or (
            self.fisher_layers >= 1 and not float(self.fisher_layers).is_integer()
        ):
            raise GastuneError(
                f"fisher_layers must be a count ≥ 1 or a fraction in (0, 1), got {self.fisher_layers}"
            )
        if self.greats_val not in ("train", "heldout"):
            raise GastuneError(f"greats_val must be train or heldout, got '{self.greats_val}'")
        if self.greats_lr is not None and self.greats_lr < 0:
            raise GastuneError(f"greats_lr must be ≥ 0, got {self.greats_lr}")

    def gast_settings(self) -> GastSettings:
        return GastSettings(
            k=self.gast_k,
            selection=self.gast_selection,
            score=self.gast_score,
            temperature=self.gast_temperature,
            granularity=self.gast_granularity,
        )

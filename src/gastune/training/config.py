"""Configuration dataclasses: one set drives the Python API, the CLI and YAML files.

``GastuneConfig`` extends transformers' ``TrainingArguments``, so every Trainer flag works;
``ModelConfig`` and ``DataConfig`` describe what to train on.
"""

import logging
import math
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from gastune.data.chat import CHAT_LOSSES
from gastune.engine.settings import GastSettings
from gastune.errors import GastuneError
from gastune.methods import METHODS
from gastune.models.loading import DEFAULT_MODEL
from gastune.training.adapters import BOTTLENECK_TUNERS, TUNERS, build_bottleneck_config

logger = logging.getLogger(__name__)

FLOAT32_MAX = 3.4028234663852886e38

# Which methods read which method-specific options (docs/methods.md); an option set to a
# non-default value for any other method is reported by ``ignored_options``.
METHOD_OPTIONS = {
    "gast_": ("gast", "gast+ist"),
    "ist_": ("ist", "gast+ist"),
    "rst_": ("rst",),
    "lisa_": ("lisa",),
    "fisher_": ("fisher",),
    "select_fraction": ("maxloss", "random-half", "gradnorm", "greats"),
    "greats_": ("greats",),
}


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
        metadata={
            "help": "Comma-separated module names, or 'auto' (LoRA: q,k,v,up,down when present; "
            "series/parallel: the MLP projections, see docs/methods.md)."
        },
    )
    bottleneck_size: int = field(
        default=256, metadata={"help": "Series/parallel adapters: bottleneck width."}
    )
    non_linearity: str = field(
        default="tanh",
        metadata={"help": "Series/parallel adapters: tanh, relu, gelu, silu, sigmoid or identity."},
    )
    adapter_dropout: float = field(default=0.0, metadata={"help": "Series/parallel adapters: input dropout."})
    adapter_scaling: str = field(
        default="1.0", metadata={"help": "Series/parallel adapters: output scale, a number or 'learned'."}
    )
    adapter_position: str = field(
        default="output",
        metadata={"help": "Series adapters: 'output' (after the target module) or 'input' (before it)."},
    )

    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: load the base model in 4 bits (bitsandbytes NF4; extra 'qlora')."},
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "Load the base model in 8 bits (bitsandbytes; extra 'qlora')."}
    )

    def __post_init__(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise GastuneError("--load_in_4bit and --load_in_8bit exclude each other; choose one")
        if self.tuner is not None and self.tuner not in TUNERS:
            raise GastuneError(f"unknown tuner '{self.tuner}'; choose one of {', '.join(TUNERS)}")
        if self.lora_r < 1:
            raise GastuneError(f"lora_r must be ≥ 1, got {self.lora_r}")
        if self.lora_alpha == 0 and self.tuner != "ia3":
            # scaling = alpha / r = 0: the adapter's output is zero and nothing trains
            raise GastuneError("lora_alpha 0 makes the adapter's scaling 0: nothing would train")
        if not 0 <= self.lora_dropout < 1:  # also catches NaN
            raise GastuneError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.tuner in BOTTLENECK_TUNERS:
            self.bottleneck_settings()  # one-line errors now, not after the model is loaded
            if self.load_in_4bit or self.load_in_8bit:  # the Trainer refuses a quantised non-peft model
                raise GastuneError(
                    f"--tuner {self.tuner} does not train on a quantised base (--load_in_4bit/8bit are "
                    "for peft tuners: QLoRA); drop the flag or use --tuner lora"
                )

    def bottleneck_settings(self) -> dict:
        """The keyword arguments ``apply_adapter`` takes for a series/parallel adapter."""
        settings = {
            "target_modules": self.target_modules,
            "bottleneck_size": self.bottleneck_size,
            "non_linearity": self.non_linearity,
            "adapter_dropout": self.adapter_dropout,
            "adapter_scaling": self.adapter_scaling,
            "adapter_position": self.adapter_position,
        }
        build_bottleneck_config(self.tuner or "series", **settings)  # validates
        return settings


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
    # 1024 (trl's max_length) keeps every answer of the README's data and configs/*.yaml (the
    # longest "mc" record of 200 per task is 383 tokens); in the whole mixture 2 of 147,580
    # records are longer and are dropped with a logged count, never trained on their prompt.
    cutoff_len: int = field(
        default=1024,
        metadata={
            "help": "Cut sequences to this many tokens; a record left with no answer token is dropped."
        },
    )
    train_on_prompt: bool = field(
        default=True,
        metadata={"help": "Loss over prompt + answer (False: answer only). Chat data: see chat_loss."},
    )
    chat_loss: str = field(
        default="assistant",
        metadata={"help": "Chat data: 'assistant' (loss on the assistant turns) or 'all' (every token)."},
    )
    support_data: str | None = field(
        default=None,
        metadata={
            "help": "GAST/GREATS held-out set: a file/folder, 'commonsense-validation', or "
            "'commonsense-heldout' (train-split records outside the training sample)."
        },
    )
    support_per_task: int = field(
        default=8,
        metadata={"help": "support_data=commonsense-heldout: records per task (8 x 8 tasks = 64)."},
    )
    label_noise: float = field(
        default=0.0,
        metadata={
            "help": "Commonsense training data: share of answers (per task) moved to a wrong option "
            "of the same question, seeded by data_seed_value. The support set stays clean."
        },
    )

    def __post_init__(self) -> None:
        from gastune.data.noise import check_fraction

        check_fraction(self.label_noise)
        if self.support_per_task < 1:
            raise GastuneError(f"support_per_task must be >= 1, got {self.support_per_task}")
        if self.chat_loss not in CHAT_LOSSES:
            raise GastuneError(f"chat_loss must be one of {', '.join(CHAT_LOSSES)}, got '{self.chat_loss}'")


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
    gast_support_pass: str = field(
        default="one",
        metadata={
            "help": "GAST: one (the default: support rows ride in the batch's forward/backward, "
            "N + K_sup rows at once) or two (a separate support pass first; less activation memory)."
        },
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
    # docs/reliability.md: what a run refuses and what a resume checks.
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace another run found in output_dir (its checkpoints are deleted)."},
    )
    resume_allow_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Resume even if the checkpoint's model, method, batch or data differ "
            "(never its adapter shape: tuner, lora_r, target_modules)."
        },
    )
    max_skipped_steps: int = field(
        default=0,
        metadata={
            "help": "Optimizer steps that may train on no sample (all dropped as non-finite) "
            "before the run fails."
        },
    )
    # transformers' default (every 500 steps) shows nothing of a short run; a fraction is of the
    # run's optimizer steps, rounded up: 0.02 logs every step up to 50 steps, 50 times in all beyond.
    logging_steps: float = field(
        default=0.02,
        metadata={
            "help": "Log loss and method statistics (gast/*) every N optimizer steps, or a fraction < 1 "
            "of the run (default 0.02: every step of a run up to 50 steps, 50 logs in all beyond)."
        },
    )

    def __post_init__(self) -> None:
        self._check_before_trainer_arguments()
        try:
            super().__post_init__()
        except ValueError as exc:  # transformers' own checks: keep the message, make it one line
            if isinstance(exc, GastuneError):
                raise
            raise GastuneError(" ".join(str(exc).split())) from exc
        if self.method not in METHODS:
            raise GastuneError(f"unknown method '{self.method}'; choose one of {', '.join(sorted(METHODS))}")
        if self.gast_support not in ("train", "heldout", "batch"):
            raise GastuneError(f"gast_support must be train, heldout or batch, got '{self.gast_support}'")
        if self.gast_support_size < 1:
            raise GastuneError(f"gast_support_size (K_sup) must be ≥ 1, got {self.gast_support_size}")
        if self.gast_support_pass not in ("one", "two"):
            raise GastuneError(f"gast_support_pass must be one or two, got '{self.gast_support_pass}'")
        self.gast_settings()  # validates k, selection, score, τ, granularity
        self._check_baselines()
        k = self.gast_k
        if self.method.startswith("gast") and k >= 1 and int(k) > self.per_device_train_batch_size:
            raise GastuneError(f"gast_k={int(k)} exceeds the batch size {self.per_device_train_batch_size}")
        ignored = self.ignored_options()
        if ignored:
            logger.warning(
                "method %s ignores %s; they have no effect on this run", self.method, ", ".join(ignored)
            )

    def _check_before_trainer_arguments(self) -> None:
        """Values that would otherwise fail late (after the model loaded) or train nothing."""
        if self.per_device_train_batch_size < 1:
            raise GastuneError(
                f"per_device_train_batch_size must be ≥ 1, got {self.per_device_train_batch_size}"
            )
        if self.gradient_accumulation_steps < 1:
            raise GastuneError(
                f"gradient_accumulation_steps must be ≥ 1, got {self.gradient_accumulation_steps}"
            )
        if not (0 <= self.learning_rate < FLOAT32_MAX):  # also NaN; a larger one overflows the optimizer
            raise GastuneError(f"learning_rate must be a finite number ≥ 0, got {self.learning_rate}")
        if self.bf16 and self.fp16:
            raise GastuneError("bf16 and fp16 cannot both be on; choose one")
        if self.max_steps == 0 or (self.max_steps < 0 and not self.num_train_epochs > 0):
            what = "max_steps 0" if self.max_steps == 0 else f"num_train_epochs {self.num_train_epochs}"
            raise GastuneError(f"{what} trains no step; give max_steps ≥ 1 or num_train_epochs > 0")
        if not math.isfinite(self.gast_k):
            raise GastuneError(f"gast_k must be a finite count or fraction, got {self.gast_k}")
        if not math.isfinite(self.gast_temperature):
            raise GastuneError(f"gast_temperature must be finite, got {self.gast_temperature}")
        if self.max_skipped_steps < 0:
            raise GastuneError(f"max_skipped_steps must be ≥ 0, got {self.max_skipped_steps}")

    def ignored_options(self) -> list[str]:
        """Method-specific options set to a non-default value that ``self.method`` never reads."""
        changed = [f.name for f in fields(GastuneConfig) if getattr(self, f.name) != f.default]
        return options_ignored_by(self.method, changed)

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


def options_ignored_by(method: str, names: list[str]) -> list[str]:
    """The method-specific options among ``names`` that ``method`` never reads.

    >>> options_ignored_by("lora", ["gast_k", "learning_rate", "ist_interval"])
    ['gast_k', 'ist_interval']
    """
    out = []
    for name in dict.fromkeys(names):
        for prefix, methods in METHOD_OPTIONS.items():
            if name.startswith(prefix):
                if method not in methods:
                    out.append(name)
                break
    return out

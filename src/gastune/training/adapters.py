"""Build the adapter for any causal LM: peft's (LoRA, DoRA, IA3, LoHa, LoKr) or gastune's own
Series and Parallel bottleneck adapters (``gastune.tuners``)."""

from __future__ import annotations

from torch import nn

from gastune.errors import GastuneError

PEFT_TUNERS = ("lora", "dora", "ia3", "loha", "lokr")
BOTTLENECK_TUNERS = ("series", "parallel")
TUNERS = PEFT_TUNERS + BOTTLENECK_TUNERS
# The paper's LoRA targets (LLaMA naming); other families fall back to peft's defaults.
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
FEEDFORWARD = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2")


def resolve_target_modules(model: nn.Module, spec: str | None) -> list[str] | None:
    """``auto``: the paper's targets present in the model, else peft's default for its type."""
    if spec and spec != "auto":
        names = [s.strip() for s in spec.split(",") if s.strip()]
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [n for n in names if n not in present]
        if missing:
            raise GastuneError(
                f"target modules {missing} are not in the model (it has e.g. {sorted(present)[:12]})"
            )
        return names
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    chosen = [t for t in PAPER_TARGETS if t in present]
    return chosen or None


def build_peft_config(
    model: nn.Module,
    tuner: str = "lora",
    r: int = 32,
    alpha: int = 64,
    dropout: float = 0.05,
    target_modules: str | None = "auto",
):
    """A peft config for ``tuner`` with targets resolved against ``model``."""
    import peft

    if tuner not in PEFT_TUNERS:
        raise GastuneError(f"unknown peft tuner '{tuner}'; choose one of {', '.join(PEFT_TUNERS)}")
    targets = resolve_target_modules(model, target_modules)
    if tuner in ("lora", "dora"):
        return peft.LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            use_dora=tuner == "dora",
            task_type="CAUSAL_LM",
        )
    if tuner == "ia3":
        ff = [t for t in (targets or []) if t in FEEDFORWARD] if targets else None
        return peft.IA3Config(target_modules=targets, feedforward_modules=ff, task_type="CAUSAL_LM")
    if tuner == "loha":
        return peft.LoHaConfig(
            r=r, alpha=alpha, module_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"
        )
    return peft.LoKrConfig(r=r, alpha=alpha, target_modules=targets, task_type="CAUSAL_LM")


def build_bottleneck_config(
    tuner: str,
    target_modules: str | None = "auto",
    bottleneck_size: int = 256,
    non_linearity: str = "tanh",
    adapter_dropout: float = 0.0,
    adapter_scaling: float | str = 1.0,
    adapter_position: str = "output",
):
    """A ``gastune.tuners.BottleneckConfig``; ``target_modules`` ``auto`` = the default placement."""
    from gastune.tuners import BottleneckConfig

    targets = None
    if target_modules and target_modules != "auto":
        targets = tuple(s.strip() for s in target_modules.split(",") if s.strip())
    return BottleneckConfig(
        kind=tuner,
        bottleneck_size=bottleneck_size,
        non_linearity=non_linearity,
        dropout=adapter_dropout,
        scaling=adapter_scaling,
        position=adapter_position,
        target_modules=targets or None,
    )


def apply_adapter(model: nn.Module, tuner: str = "lora", **kwargs) -> nn.Module:
    """Wrap ``model`` with a fresh adapter.

    peft tuners take ``build_peft_config``'s arguments; ``series``/``parallel`` take
    ``build_bottleneck_config``'s (LoRA's ``r``, ``alpha`` and ``dropout`` do not apply to them
    and are ignored).
    """
    if tuner in BOTTLENECK_TUNERS:
        from gastune.tuners import apply_bottleneck

        settings = {k: v for k, v in kwargs.items() if k not in ("r", "alpha", "dropout")}
        return apply_bottleneck(model, build_bottleneck_config(tuner, **settings))
    import peft

    return peft.get_peft_model(model, build_peft_config(model, tuner=tuner, **kwargs))

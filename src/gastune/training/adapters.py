"""Build the peft adapter (LoRA, DoRA, IA3, LoHa, LoKr) for any causal LM."""

from __future__ import annotations

from torch import nn

from gastune.errors import GastuneError

TUNERS = ("lora", "dora", "ia3", "loha", "lokr")
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

    if tuner not in TUNERS:
        raise GastuneError(f"unknown tuner '{tuner}'; choose one of {', '.join(TUNERS)}")
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


def apply_adapter(model: nn.Module, **kwargs) -> nn.Module:
    """Wrap ``model`` with a fresh adapter (see ``build_peft_config`` for the arguments)."""
    import peft

    return peft.get_peft_model(model, build_peft_config(model, **kwargs))

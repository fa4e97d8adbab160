"""Dense training (``lora``, ``dora``, ``dense``): every sample updates every adapter.

The tuner (LoRA or DoRA) is chosen by ``--tuner``; the method names only say the step is dense.
"""

from __future__ import annotations

from gastune.methods.base import TrainingMethod, register_method


@register_method("lora")
@register_method("dora")
@register_method("dense")
def _dense(config=None, **_) -> TrainingMethod:
    return TrainingMethod()

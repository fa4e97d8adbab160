"""Frozen layers under DeepSpeed ZeRO-3: no update, optimizer state kept.

ZeRO-3's optimizer does not step the model's parameters: it steps flat fp32 partitions, one per
*sub-group* of parameters (``zero_optimization.sub_group_size`` elements), and gives a
parameter with ``requires_grad=False`` a zero gradient there. A layer a layer-selective method
(LISA, IST, RST, Fisher, gast+ist) froze for the step would therefore still be stepped: AdamW
decays its weights, advances its moments and its step count — where the optimizer under data
parallelism skips a parameter without a gradient altogether. This is where LISA and BAdam broke
under ZeRO-3 (LLaMA-Factory's BAdam rebuilds DeepSpeed's partitions when it switches blocks).

``skip_frozen_subgroups`` keeps DeepSpeed's own partitioning and step: it only hides the
gradient of a sub-group whose parameters are all frozen this step, so the optimizer skips it
exactly as torch's optimizers skip a parameter without ``.grad``. That needs every sub-group to
be frozen or trained as a whole: ``sub_group_size: 1`` (one sub-group per tensor, as in
``configs/deepspeed/zero3.json``). A sub-group mixing frozen and trained tensors is refused in
one line at the first step that mixes them.
"""

from __future__ import annotations

import logging

from gastune.errors import GastuneError

logger = logging.getLogger(__name__)


def zero3_optimizer(optimizer):
    """DeepSpeed's ZeRO-3 optimizer behind ``optimizer`` (accelerate's wrapper), or ``None``."""
    for candidate in (optimizer, getattr(optimizer, "optimizer", None)):
        if candidate is not None and hasattr(candidate, "fp32_partitioned_groups_flat"):
            return candidate
    return None


def skip_frozen_subgroups(zero_optimizer) -> None:
    """Make ``zero_optimizer`` (a ``DeepSpeedZeroOptimizer_Stage3``) skip, at each step, every
    sub-group whose parameters all have ``requires_grad=False``. Idempotent."""
    if getattr(zero_optimizer, "_gastune_skips_frozen", False):
        return
    step_subgroup = zero_optimizer._optimizer_step

    def _optimizer_step(sub_group_id):
        params = zero_optimizer.fp16_groups[sub_group_id]
        trained = [p.requires_grad for p in params]
        if all(trained):
            return step_subgroup(sub_group_id)
        if any(trained):
            raise GastuneError(
                "a layer-freezing method under DeepSpeed ZeRO-3 needs one optimizer sub-group per "
                'tensor: set "sub_group_size": 1 in zero_optimization (configs/deepspeed/zero3.json)'
            )
        # all frozen: like a parameter without .grad, the optimizer leaves it and its state alone
        flat = zero_optimizer.fp32_partitioned_groups_flat[sub_group_id]
        grad, flat.grad = flat.grad, None
        try:
            return step_subgroup(sub_group_id)
        finally:
            flat.grad = grad

    zero_optimizer._optimizer_step = _optimizer_step
    zero_optimizer._gastune_skips_frozen = True
    logger.info(
        "DeepSpeed ZeRO-3: %d optimizer sub-groups; a frozen one is skipped at each step",
        len(zero_optimizer.fp16_groups),
    )

"""Test support for tests/integration/test_distributed_engines.py: run ``gastune train`` under
``accelerate launch`` and record what really happened on each rank.

    accelerate launch --config_file CONFIG tests/integration/_engine_probe.py train ARGS...

Under ``$GASTUNE_PROBE_DIR`` each rank writes:

- ``engine_rank{r}.json`` at its first training step: the model's wrapper, the distributed type
  and process-group backend, DeepSpeed's ZeRO stage and optimizers, whether FSDP is on, how many
  parameters are DTensors (FSDP2 shards) and which modules are FSDP-wrapped;
- ``params_rank{r}.pt`` after training: every trainable parameter, whole (DTensors gathered);
- ``selections_rank{r}.pt`` after training: the method's selection masks on this rank;
- ``optim_rank{r}.pt`` after training (not under DeepSpeed ZeRO-1/2): the optimizer state per
  parameter; under ZeRO-3 this rank's partition of it (one optimizer sub-group per tensor).

CPU FSDP (``GASTUNE_TEST_CPU_FSDP=1``): accelerate has no FSDP on the CPU. ``AcceleratorState``
turns a launch into FSDP only for a GPU-like distributed type, so with ``--use_cpu true`` an FSDP
config silently becomes plain multi-CPU data parallel (``MULTI_CPU``, DDP). This switches that
state to FSDP on gloo, keeping the FSDP plugin accelerate built from the launch config, so the
Trainer wraps the model with FSDP2 for real (``fully_shard`` per decoder layer, DTensor
parameters). It tests our trainer under a real FSDP2 wrap; it does not test accelerate's own
GPU placement for FSDP.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys


def switch_cpu_launch_to_fsdp() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # Every AcceleratorState() copies PartialState's fields again: switch it there too.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            print(f"[cpu-fsdp] MULTI_CPU -> FSDP (fsdp_version={fsdp_plugin.fsdp_version})", flush=True)

    AcceleratorState.__init__ = __init__


def engine_info(trainer, model) -> dict:
    import torch.distributed as dist

    inner = trainer.accelerator.unwrap_model(model)
    params = list(inner.named_parameters())
    info = {
        "wrapper": type(model).__name__,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "world_size": trainer.args.world_size,
        "deepspeed": bool(trainer.is_deepspeed_enabled),
        "fsdp": bool(trainer.is_fsdp_enabled),
        "params": len(params),
        "dtensor_params": sum(type(p).__name__ == "DTensor" for _, p in params),
        "fsdp_modules": sorted({type(m).__name__ for m in inner.modules() if "FSDP" in type(m).__name__}),
        # DeepSpeed ZeRO-3: parameters held as a partition (empty outside their module's forward)
        "zero3_partitioned_params": sum(hasattr(p, "ds_tensor") and p.numel() == 0 for _, p in params),
    }
    if trainer.is_deepspeed_enabled:
        engine = trainer.model_wrapped
        zero = engine.optimizer
        info.update(
            zero_stage=engine.zero_optimization_stage(),
            zero_optimizer=type(zero).__name__,
            # ZeRO-1/2: one count per parameter group; ZeRO-3: one int
            zero_partition_count=list(getattr(zero, "partition_count", None) or [])
            if not isinstance(getattr(zero, "partition_count", None), int)
            else [zero.partition_count],
            base_optimizer=type(getattr(zero, "optimizer", None)).__name__,
        )
    if trainer.is_fsdp_enabled:
        plugin = trainer.accelerator.state.fsdp_plugin
        info.update(fsdp_version=plugin.fsdp_version, fsdp_state_dict_type=str(plugin.state_dict_type))
    return info


def optimizer_state(trainer, inner) -> dict:
    """The optimizer's state of every trainable parameter, by name, whole (DTensors gathered in
    the same order on every rank): e.g. AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``."""
    state = (
        trainer.optimizer.optimizer.state
        if hasattr(trainer.optimizer, "optimizer")
        else trainer.optimizer.state
    )
    out = {}
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        entry = {}
        for key, value in sorted(state.get(p, {}).items()):
            if hasattr(value, "full_tensor"):
                value = value.full_tensor()
            entry[key] = value.detach().float().cpu().clone() if hasattr(value, "detach") else value
        out[name] = entry
    return out


def zero3_optimizer_state(trainer, inner) -> dict:
    """Under ZeRO-3 (one sub-group per tensor): each trainable parameter's optimizer state on
    this rank, i.e. of its fp32 partition, and where that partition starts in the flat tensor."""
    zero = trainer.optimizer.optimizer
    names = {id(p): n for n, p in inner.named_parameters()}
    out = {}
    for i, group in enumerate(zero.fp16_groups):
        assert len(group) == 1, "ZeRO-3 probe expects sub_group_size 1"
        param = group[0]
        flat = zero.fp32_partitioned_groups_flat[i]
        entry = {}
        for key, value in sorted(zero.optimizer.state.get(flat, {}).items()):
            entry[key] = value.detach().float().cpu().clone() if hasattr(value, "detach") else value
        entry["partition_start"] = param.ds_tensor.ds_numel * trainer.args.process_index
        entry["numel"] = param.ds_numel
        out[names[id(param)]] = entry
    return out


def trained_parameters(trainer, inner) -> dict:
    """Every trainable parameter, whole: DTensors gathered; ZeRO-3 partitions gathered (a
    collective: every rank runs it, in the same order)."""
    import torch

    named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_tensor") for _, p in named):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named])
    params = {}
    with gather, torch.no_grad():
        for name, p in named:
            t = p.detach()
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            params[name] = t.float().cpu().clone()
    return params


def install_probes(probe_dir: str) -> None:
    import torch

    from gastune.training.trainer import GastuneMixin

    os.makedirs(probe_dir, exist_ok=True)
    training_step, train = GastuneMixin.training_step, GastuneMixin.train

    def probed_training_step(self, model, inputs, num_items_in_batch=None):
        path = os.path.join(probe_dir, f"engine_rank{self.args.process_index}.json")
        if not os.path.exists(path):
            with open(path, "w") as f:
                json.dump(engine_info(self, model), f)
        return training_step(self, model, inputs, num_items_in_batch)

    def probed_train(self, *args, **kwargs):
        output = train(self, *args, **kwargs)
        inner = self.accelerator.unwrap_model(self.model_wrapped)
        rank = self.args.process_index
        params = trained_parameters(self, inner)  # same order on every rank: the gathers match
        torch.save(params, os.path.join(probe_dir, f"params_rank{self.args.process_index}.pt"))
        # what the method chose on this rank: its selection masks (a wrapped method's too)
        method = self.method
        selections = {
            "masks": [m.clone() for _, m in getattr(method, "masks", [])],
            "inner_masks": [m.clone() for _, m in getattr(getattr(method, "inner", None), "masks", [])],
        }
        torch.save(selections, os.path.join(probe_dir, f"selections_rank{self.args.process_index}.pt"))
        if not self.is_deepspeed_enabled:
            torch.save(optimizer_state(self, inner), os.path.join(probe_dir, f"optim_rank{rank}.pt"))
        elif self.model_wrapped.zero_optimization_stage() == 3:
            torch.save(zero3_optimizer_state(self, inner), os.path.join(probe_dir, f"optim_rank{rank}.pt"))
        return output

    GastuneMixin.training_step = probed_training_step
    GastuneMixin.train = probed_train


if __name__ == "__main__":
    if os.environ.get("GASTUNE_TEST_CPU_FSDP") == "1":
        switch_cpu_launch_to_fsdp()
    install_probes(os.environ["GASTUNE_PROBE_DIR"])
    from gastune.cli.main import main

    sys.exit(main(sys.argv[1:]))

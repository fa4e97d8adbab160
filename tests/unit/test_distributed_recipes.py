"""The recipes of docs/distributed.md: ``accelerate launch`` data parallel on 2 CPU
processes through the real CLI, GAST under bf16 autocast and under gradient checkpointing,
and the refusal of parameter sharding (FSDP / ZeRO-3) for sparse methods.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from gastune.engine import GastEngine, per_sample_loss
from gastune.errors import GastuneError
from gastune.training import GastuneConfig, GastuneTrainer, TrainingMethod
from gastune.training.trainer import check_sharding
from tests import helpers
from tests.helpers import (
    LR,
    POISON_WORDS,
    REPO,
    accelerate_launch,
    recipe_data,
    recipe_train_args,
    row_dataset,
    sgd_config,
    stack_rows,
)
from tests.unit._model_folder import save_tiny_llama


# ------------------------------------------------------------ accelerate launch, 2 CPU ranks
def test_accelerate_ddp_cpu_recipe_trains_saves_and_survives_a_nan_sample(tmp_path):
    """The documented command, 2 steps on 2 CPU ranks, batch 4 per rank: the 16 records are
    one epoch, so each rank meets its own half, including the two poisoned records."""
    save_tiny_llama(tmp_path / "model", poison_words=POISON_WORDS)
    data = recipe_data(tmp_path / "data.jsonl", poison=True)
    out = tmp_path / "run"
    code, log = accelerate_launch(
        REPO / "configs/accelerate/ddp_cpu.yaml",
        ["-m", "gastune.cli.main"],
        recipe_train_args(tmp_path / "model", data, out, method="gast"),
        cwd=tmp_path,
        timeout=240,
    )
    assert code == 0, log[-6000:]

    # Both ranks reached the final checkpoint: each wrote its RNG and GAST generator states.
    ckpt = out / "checkpoint-2"
    for rank in (0, 1):
        assert (ckpt / f"rng_state_{rank}.pth").is_file()
        assert (ckpt / f"gastune_method_state_{rank}.pt").is_file()
    states = [torch.load(ckpt / f"gastune_method_state_{r}.pt") for r in (0, 1)]
    assert not torch.equal(states[0]["select_gen"], states[1]["select_gen"])  # each rank draws its own
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "adapter_model.safetensors").is_file() and (out / "gastune_config.json").is_file()
    assert log.count("saved the gast adapter") == 1  # printed by rank 0 only

    # The two poisoned records were dropped where they fell (no rank hung in a collective),
    # and the adapter is finite.
    dropped = [int(n) for n in re.findall(r"dropped (\d+) of \d+ samples with a non-finite loss", log)]
    assert sum(dropped) == 2, log[-4000:]
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(out / "adapter_model.safetensors").values())


# ------------------------------------------------------------ bf16 and checkpointing
def lora_model() -> torch.nn.Module:
    return helpers.lora_model(layers=2)


def config(out: Path, **overrides) -> GastuneConfig:
    defaults = dict(
        output_dir=str(out),
        method="gast",
        gast_k=2,
        gast_support="train",
        gast_support_size=3,
        logging_steps=500,
    )
    return sgd_config(**{**defaults, **overrides})


def per_sample_grads(model, batch, params) -> list[torch.Tensor]:
    """fp32 per-sample gradients, one sample at a time: ``(N, *p.shape)`` per parameter."""
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        out = model(
            input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1]
        )
        loss = per_sample_loss(out.logits, batch["labels"][i : i + 1]).mean()
        rows.append(torch.autograd.grad(loss, params))
    return [torch.stack(g) for g in zip(*rows)]


def test_gast_step_under_bf16_autocast_matches_the_fp32_reference(tmp_path):
    model = lora_model()
    before = copy.deepcopy(model)
    trainer = GastuneTrainer(
        model=model, args=config(tmp_path, bf16=True), train_dataset=row_dataset(), data_collator=stack_rows
    )
    seen = {}
    step = trainer.method.training_step

    def recording(trainer_, model_, inputs, run):
        seen["inputs"] = inputs
        loss = step(trainer_, model_, inputs, run)
        seen["records"] = list(trainer.method.engine.records)
        return loss

    trainer.method.training_step = recording
    dtypes = []
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    q_proj.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    trainer.train()
    assert dtypes and set(dtypes) == {torch.bfloat16}, "the step did not run under bf16 autocast"

    # Reference: fp32 per-sample gradients of the same micro-batch, averaged over the samples
    # the bf16 step chose in each block (the choice itself may differ at bf16 resolution).
    # bf16 keeps ~3 significant digits, so the update is within a few percent of fp32 — and
    # no further from it than plain bf16 autograd (the same samples, one at a time).
    engine = GastEngine(before)
    batch = seen["inputs"]
    names = {id(p): n for n, p in before.named_parameters()}
    for record in seen["records"]:
        params = engine.groups[record.group].params
        fp32 = per_sample_grads(before, batch, params)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = per_sample_grads(before, batch, params)
        assert len(record.chosen) == 2
        for p, g32, g16 in zip(params, fp32, bf16):
            expected = g32[record.chosen].mean(dim=0)
            applied = (before.get_parameter(names[id(p)]) - model.get_parameter(names[id(p)])) / LR
            err = ((applied - expected).norm() / expected.norm()).item()
            autograd_err = (
                (g16[record.chosen].mean(dim=0).float() - expected).norm() / expected.norm()
            ).item()
            assert err < 5e-2, f"{names[id(p)]}: relative error {err:.3g}"
            assert err <= 1.25 * autograd_err + 1e-3, (
                f"{names[id(p)]}: {err:.3g} vs autograd {autograd_err:.3g}"
            )


def test_gradient_checkpointing_through_the_trainer_equals_the_plain_run(tmp_path):
    results = []
    for checkpointing in (False, True):
        model = lora_model()
        args = config(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing, max_steps=3)
        trainer = GastuneTrainer(
            model=model, args=args, train_dataset=row_dataset(), data_collator=stack_rows
        )
        trainer.train()
        assert model.base_model.model.is_gradient_checkpointing == checkpointing
        params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((params, [m for _, m in trainer.method.masks]))
    (plain, plain_masks), (ckpt, ckpt_masks) = results
    assert all(torch.equal(a, b) for a, b in zip(plain_masks, ckpt_masks))
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------ sharding
def _sharded_trainer(tmp_path, monkeypatch, backend: str, model=None):
    """FSDP/ZeRO-3 cannot run in the fast tier: the check is fed their flags."""
    from types import SimpleNamespace

    trainer = GastuneTrainer(
        model=model if model is not None else lora_model(),
        args=config(tmp_path),
        train_dataset=row_dataset(),
        data_collator=stack_rows,
    )
    if backend.startswith("fsdp"):
        monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
        plugin = SimpleNamespace(fsdp_version=int(backend[-1]))
        monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", plugin, raising=False)
    else:
        monkeypatch.setattr(trainer, "is_deepspeed_enabled", True)
        monkeypatch.setattr("gastune.training.trainer.is_deepspeed_zero3_enabled", lambda: True)
    return trainer


def test_sparse_methods_refuse_fsdp1_in_one_line(tmp_path, monkeypatch):
    trainer = _sharded_trainer(tmp_path, monkeypatch, "fsdp1")
    with pytest.raises(GastuneError, match="method 'gast' does not support FSDP1 ") as err:
        check_sharding(trainer)
    assert "\n" not in str(err.value)
    monkeypatch.setattr(trainer, "method", TrainingMethod())  # dense LoRA: plain Trainer training
    check_sharding(trainer)


@pytest.mark.parametrize("stage", [1, 2])
def test_layer_freezing_methods_refuse_zero1_and_zero2_in_one_line(stage, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from gastune.methods import build_method

    trainer = _sharded_trainer(tmp_path, monkeypatch, "zero3")
    plugin = SimpleNamespace(zero_stage=stage)
    monkeypatch.setattr(type(trainer.accelerator.state), "deepspeed_plugin", property(lambda _: plugin))
    monkeypatch.setattr("gastune.training.trainer.is_deepspeed_zero3_enabled", lambda: False)
    check_sharding(trainer)  # gast selects samples, it freezes nothing: allowed
    for name in ("lisa", "ist", "rst", "fisher", "gast+ist"):
        monkeypatch.setattr(trainer, "method", build_method(config(tmp_path, method=name)))
        with pytest.raises(GastuneError, match=f"method '{re.escape(name)}' freezes layers per step") as err:
            check_sharding(trainer)
        assert f"ZeRO-{stage} " in str(err.value) and "\n" not in str(err.value)
    # the same methods under ZeRO-3, where frozen sub-groups are skipped (gastune.training.zero3)
    monkeypatch.setattr("gastune.training.trainer.is_deepspeed_zero3_enabled", lambda: True)
    check_sharding(trainer)


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_every_method_is_accepted_under_fsdp2_and_zero3(backend, tmp_path, monkeypatch):
    # gast; tests/integration/test_fsdp2_methods.py and test_zero3_methods.py train every method
    trainer = _sharded_trainer(tmp_path, monkeypatch, backend)
    check_sharding(trainer)


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_a_quantised_base_refuses_parameter_sharding(backend, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model = lora_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.base_layer = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=False)
    trainer = _sharded_trainer(tmp_path, monkeypatch, backend, model=model)
    with pytest.raises(GastuneError, match=r"a 4-bit/8-bit \(bitsandbytes\) base is not supported under"):
        check_sharding(trainer)


def test_shipped_launch_configs_are_well_formed():
    for name in ("ddp_cpu", "ddp_gpu", "deepspeed_zero2", "deepspeed_zero3"):
        cfg = yaml.safe_load((REPO / f"configs/accelerate/{name}.yaml").read_text())
        assert cfg["num_processes"] >= 2 and cfg["distributed_type"] in ("MULTI_GPU", "DEEPSPEED")
        if name.startswith("deepspeed_zero"):
            ds_path = cfg["deepspeed_config"]["deepspeed_config_file"]
            zero = json.loads((REPO / ds_path).read_text())["zero_optimization"]
            assert zero["stage"] == int(name[-1])
    # ZeRO-3: one optimizer sub-group per tensor, so a frozen layer's can be skipped
    # (gastune.training.zero3); every parameter partitioned; the whole adapter gathered on save
    assert zero["sub_group_size"] == 1 and zero["stage3_param_persistence_threshold"] == 0
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    fsdp = yaml.safe_load((REPO / "configs/fsdp/fsdp2_lora.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    # SHARDED_STATE_DICT makes save_model write no adapter (tests/integration/test_distributed_engines.py)
    assert fsdp["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    # 2 machines × 1 process (tests/integration/test_multinode.py launches each machine rank)
    multi = yaml.safe_load((REPO / "configs/accelerate/multinode_cpu.yaml").read_text())
    assert multi["num_machines"] == 2 and multi["num_processes"] == 2 and multi["rdzv_backend"] == "static"

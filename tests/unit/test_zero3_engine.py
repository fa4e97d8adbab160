"""The engine under a real DeepSpeed ZeRO-3 engine, in one gloo process.

With one rank ZeRO-3 still does what matters to the engine: every parameter (adapters too, with
``stage3_param_persistence_threshold: 0``) is an empty partition outside the forward of the
module owning it, gathered by DeepSpeed's module hooks, and its gradient is taken from ``.grad``
by DeepSpeed's post-accumulate hooks into its own partition buffers. GAST (its block gate
needs the block's adapters outside their own modules: ``gastune.engine.live.gather_with_blocks``),
the support gradient, the per-sample scoring pass and the diagonal Fisher must give what they
give on the same model unwrapped; a frozen layer must not be stepped. Skipped without the
``deepspeed`` extra. (2 ranks against DDP: tests/integration/test_zero3_methods.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from gastune.engine import GastEngine, GastSettings, per_sample_loss, support_gradients
from gastune.errors import GastuneError
from gastune.training.zero3 import skip_frozen_subgroups, zero3_optimizer
from tests.conftest import make_batch
from tests.helpers import free_port, lora_model
from tests.unit.test_fsdp2_engine import assert_scores_and_fisher_equal

deepspeed = pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")

CONFIG = {
    "train_micro_batch_size_per_gpu": 6,
    "gradient_accumulation_steps": 1,
    # no prefetching and no keeping for reuse: a parameter is whole only while DeepSpeed's hooks
    # say it is needed (with them, a tiny model's adapters may happen to be whole anyway)
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "sub_group_size": 1,
        "stage3_prefetch_bucket_size": 0,
        "stage3_max_reuse_distance": 0,
    },
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
}


@pytest.fixture(scope="module")
def gloo():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    port = free_port()
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def zero3(model, optimizer_cls=torch.optim.SGD, sub_group_size=1, **optim):
    config = copy.deepcopy(CONFIG)
    config["zero_optimization"]["sub_group_size"] = sub_group_size
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer_cls(params, lr=0.1, **optim), config=config
    )
    # every parameter is an empty partition outside its module's forward
    assert all(hasattr(p, "ds_tensor") and p.numel() == 0 for p in model.parameters())
    return engine


def full_grads(model) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            g = safe_get_full_grad(p) if hasattr(p, "ds_tensor") else p.grad
            out[n] = g.detach().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape).clone()
    return out


def gast_step(model, engine, batch, support_batch):
    gast = GastEngine(model, GastSettings(k=2)).attach()
    blocks = gast.blocks.blocks
    support = support_gradients(model, support_batch, gast.block_parameters, blocks=blocks)
    with gast.step(batch["input_ids"].shape[0], support, step_seed=5):
        out = (engine or model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = per_sample_loss(out.logits, batch["labels"]).mean()
        engine.backward(loss) if engine is not None else loss.backward()
    grads = full_grads(model)
    records = sorted((r.group, r.chosen) for r in gast.records)
    gast.detach()
    return support, grads, records


def test_gast_under_zero3_selects_and_updates_like_the_unwrapped_model(gloo):
    plain = lora_model(layers=3)
    sharded = copy.deepcopy(plain)
    engine = zero3(sharded)
    batch, support_batch = make_batch(n=6), make_batch(n=2, seed=9)
    support_p, grads_p, records_p = gast_step(plain, None, batch, support_batch)
    support_s, grads_s, records_s = gast_step(sharded, engine, batch, support_batch)
    assert records_s == records_p and len(records_p) == 3
    # support gradients are whole (not empty partitions)
    assert sorted(t.shape for t in support_s.values()) == sorted(t.shape for t in support_p.values())
    assert all(t.abs().sum() > 0 for t in support_s.values())
    assert sorted(grads_s) == sorted(grads_p) and len(grads_p) == 3 * 5 * 2
    for name, g in grads_p.items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(grads_s[name], g, rtol=1e-5, atol=1e-7)


def test_scoring_pass_and_fisher_under_zero3_equal_the_unwrapped_model(gloo):
    plain = lora_model(layers=3)
    sharded = copy.deepcopy(plain)
    zero3(sharded)
    assert_scores_and_fisher_equal(plain, sharded)


def adamw_step(engine, model, batch):
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    engine.backward(per_sample_loss(out.logits, batch["labels"]).mean())
    engine.step()


def partitions(engine) -> dict[str, tuple[torch.Tensor, dict]]:
    """Each trainable tensor's fp32 partition and AdamW state (one sub-group per tensor)."""
    zero = zero3_optimizer(engine.optimizer)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    out = {}
    for group, flat in zip(zero.fp16_groups, zero.fp32_partitioned_groups_flat):
        state = {
            k: v.clone() if torch.is_tensor(v) else v for k, v in zero.optimizer.state.get(flat, {}).items()
        }
        out[names[id(group[0])]] = (flat.detach().clone(), state)
    return out


def test_zero3_frozen_layer_is_not_stepped_and_keeps_its_optimizer_state(gloo):
    """AdamW with weight decay, one sub-group per tensor: layer 0 trains at step 1, then is
    frozen at step 2 (as LISA does). Without gastune's skip ZeRO-3 steps it anyway (zero
    gradient: weight decay and the moments move it); with it, layer 0's partitions and AdamW
    state stay as step 1 left them, while the other layers train on."""
    batch = make_batch(n=6)
    results = {}
    for skip in (False, True):
        model = lora_model(layers=2)
        engine = zero3(model, torch.optim.AdamW, weight_decay=0.1)
        if skip:
            skip_frozen_subgroups(zero3_optimizer(engine.optimizer))
        adamw_step(engine, model, batch)
        after_one = partitions(engine)
        for n, p in model.named_parameters():
            if ".layers.0." in n and "lora_" in n:
                p.requires_grad_(False)
        adamw_step(engine, model, batch)
        results[skip] = after_one, partitions(engine)
    for skip, (before, after) in results.items():
        frozen = [n for n in before if ".layers.0." in n]
        assert len(frozen) == 5 * 2 and len(before) == 2 * 5 * 2
        for name, (flat, state) in after.items():
            moved = not torch.equal(flat, before[name][0])
            if name in frozen and skip:
                assert not moved and int(state["step"]) == 1, name
                for key in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(state[key], before[name][1][key]), (name, key)
            elif name in frozen:  # ZeRO-3 alone: the frozen layer is stepped with a zero gradient
                assert moved and int(state["step"]) == 2, name
            else:
                assert moved and int(state["step"]) == 2, name


def test_zero3_refuses_a_subgroup_mixing_frozen_and_trained_tensors(gloo):
    model = lora_model(layers=2)
    engine = zero3(model, torch.optim.AdamW, sub_group_size=10**9)  # one sub-group for all
    skip_frozen_subgroups(zero3_optimizer(engine.optimizer))
    for n, p in model.named_parameters():
        if ".layers.0." in n:
            p.requires_grad_(False)
    with pytest.raises(GastuneError, match='set "sub_group_size": 1') as err:
        adamw_step(engine, model, make_batch(n=6))
    assert "\n" not in str(err.value)

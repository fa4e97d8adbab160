"""The engine under a real FSDP2 wrap (``fully_shard`` per decoder block), in one gloo process.

With one rank FSDP2 still does everything that matters to the engine: every parameter becomes
a DTensor shard, and each block's forward and backward run on gathered copies swapped in by
its hooks, whose gradients FSDP2 then reduce-scatters into the shards' ``.grad``. GAST, the
support gradient, the per-sample scoring pass and the diagonal Fisher must give what they give
on the same model unwrapped. (2 ranks against DDP: tests/integration/test_fsdp2_methods.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from gastune.engine import GastEngine, GastSettings, per_sample_loss, support_gradients
from gastune.methods.layerwise import diagonal_fisher
from gastune.methods.persample import PerSampleGradients
from gastune.models import find_decoder_blocks, trainable_by_block
from tests.conftest import make_batch
from tests.helpers import free_port, lora_model


@pytest.fixture(scope="module")
def gloo():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def models():
    from torch.distributed.fsdp import fully_shard

    plain = lora_model(layers=3)
    sharded = copy.deepcopy(plain)
    for block in find_decoder_blocks(sharded).blocks:
        fully_shard(block)
    fully_shard(sharded)
    assert all(type(p).__name__ == "DTensor" for p in sharded.parameters())
    return plain, sharded


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gast_step(model, batch, support_batch):
    engine = GastEngine(model, GastSettings(k=2)).attach()
    blocks = engine.blocks.blocks
    support = support_gradients(model, support_batch, engine.block_parameters, blocks=blocks)
    with engine.step(batch["input_ids"].shape[0], support, step_seed=5):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        per_sample_loss(out.logits, batch["labels"]).mean().backward()
    grads = {n: whole(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}
    records = sorted((r.group, r.chosen) for r in engine.records)
    engine.detach()
    return support, grads, records


def test_gast_under_fsdp2_selects_and_updates_like_the_unwrapped_model(gloo):
    plain, sharded = models()
    batch, support_batch = make_batch(n=6), make_batch(n=2, seed=9)
    support_p, grads_p, records_p = gast_step(plain, batch, support_batch)
    support_s, grads_s, records_s = gast_step(sharded, batch, support_batch)
    assert records_s == records_p and len(records_p) == 3
    # support gradients are whole on every rank (not empty, not shards)
    assert sorted(t.shape for t in support_s.values()) == sorted(t.shape for t in support_p.values())
    assert all(t.abs().sum() > 0 for t in support_s.values())
    assert sorted(grads_s) == sorted(grads_p) and len(grads_p) == 3 * 5 * 2
    for name, g in grads_p.items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(grads_s[name], g, rtol=1e-5, atol=1e-7)


def test_scoring_pass_and_fisher_under_fsdp2_equal_the_unwrapped_model(gloo):
    assert_scores_and_fisher_equal(*models())


def assert_scores_and_fisher_equal(plain, sharded) -> None:
    """The per-sample scoring pass and the diagonal Fisher of ``sharded`` equal ``plain``'s
    (also used by test_zero3_engine.py)."""
    batch = make_batch(n=4)
    scores = [PerSampleGradients(m).score(batch, gram=True) for m in (plain, sharded)]
    assert scores[0].sq_norms.min() > 0
    torch.testing.assert_close(scores[1].sq_norms, scores[0].sq_norms, rtol=1e-5, atol=0)
    torch.testing.assert_close(scores[1].gram, scores[0].gram, rtol=1e-5, atol=1e-9)
    fisher = []
    for m in (plain, sharded):
        blocks = find_decoder_blocks(m)
        per_block = [[p for _, p in named] for named in trainable_by_block(m, blocks)[0]]
        rows = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(4)]
        fisher.append(diagonal_fisher(m, rows, per_block, blocks=blocks.blocks))
    for fp, fs in zip(fisher[0], fisher[1]):
        for a, b in zip(fp, fs):
            assert a.abs().sum() > 0
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-12)


def test_fsdp2_optimizer_loading_keeps_an_untrained_layer_without_state(gloo):
    """LISA's checkpoint holds no AdamW state for a layer not trained yet. torch's FSDP2 loading
    refuses it (strict) and otherwise makes up state for it (a zero-gradient step: step count 1);
    under gastune's loading the layer has no state and the others are restored exactly."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from gastune.training.fsdp_resume import lenient_optimizer_state_loading

    def sharded_adamw():
        model = models()[1]
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)

    full = StateDictOptions(full_state_dict=True)
    model, optimizer = sharded_adamw()
    batch = make_batch(n=2)
    for n, p in model.named_parameters():
        p.requires_grad_(".layers.0." in n)  # only layer 0 trains, as in a LISA step
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    per_sample_loss(out.logits, batch["labels"]).mean().backward()
    optimizer.step()
    for p in model.parameters():
        p.requires_grad_(True)
    saved = get_optimizer_state_dict(model, optimizer, options=full)
    assert saved["state"] and all(".layers.0." in k for k in saved["state"])

    with pytest.raises(RuntimeError, match="Missing optimizer state"):
        set_optimizer_state_dict(*sharded_adamw(), saved, options=full)
    model, optimizer = sharded_adamw()
    with lenient_optimizer_state_loading():
        from torch.distributed.checkpoint import state_dict as module

        module.set_optimizer_state_dict(model, optimizer, saved, options=full)
    names = {id(p): n for n, p in model.named_parameters()}
    has_state = {names[id(p)] for p in optimizer.state}
    assert has_state == set(saved["state"])
    for p, state in optimizer.state.items():
        expected = saved["state"][names[id(p)]]
        assert int(state["step"]) == 1
        torch.testing.assert_close(whole(state["exp_avg"]), whole(expected["exp_avg"]), rtol=0, atol=0)

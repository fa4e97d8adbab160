"""Slow tier: QLoRA on the real embedded model (SmolLM2-135M loaded in 4-bit NF4).

GAST trains on the 4-bit base and its loss drops; one GAST step on that quantised model (its
first 4 blocks) equals the one-sample-at-a-time reference on the same model (same indices,
allclose update).
Run with ``make test-integration`` (``pytest -m integration``).
"""

from __future__ import annotations

import pytest
import torch

from gastune.data import CausalLMCollator
from gastune.engine import GastEngine, GastSettings, per_sample_loss, support_gradients
from gastune.engine.reference import reference_gast_gradients
from gastune.models import load_tokenizer
from gastune.training import DataConfig, GastuneConfig, ModelConfig
from gastune.training.adapters import apply_adapter
from gastune.training.run import build_dataset, load_base_model, load_training_records, train
from tests.helpers import record_reference_choices, short_run

pytestmark = pytest.mark.integration
pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")

DATA = DataConfig(tasks="boolq,arc_easy", per_task=16, cutoff_len=96)
LAYERS = 4


def test_real_model_trains_gast_on_a_4bit_base_and_loss_drops(tmp_path):
    config = short_run(tmp_path / "gast", "gast")
    model_cfg = ModelConfig(lora_r=8, lora_alpha=16, lora_dropout=0.0, load_in_4bit=True)
    result = train(model_cfg, DATA, config)
    q = result.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q).__name__ == "Linear4bit" and q.weight.quant_state.quant_type == "nf4"
    losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    assert (tmp_path / "gast" / "adapter_model.safetensors").is_file()


def test_gast_step_on_the_4bit_real_model_equals_the_reference(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = GastuneConfig(output_dir=str(tmp_path), use_cpu=True)
    model = load_base_model(ModelConfig(load_in_4bit=True), config)
    # The reference costs one backward per sample and block: keep the first 4 of the 30 blocks
    # (the same NF4 weights) so it runs in minutes on a CPU.
    model.model.layers = model.model.layers[:LAYERS]
    model.config.num_hidden_layers = LAYERS
    model = apply_adapter(model, r=4, alpha=8, dropout=0.0)
    for name, p in model.named_parameters():  # LoRA B starts at zero: give every tensor a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    tokenizer = load_tokenizer()
    rows = build_dataset(load_training_records(DATA), tokenizer, DATA)
    collate = CausalLMCollator(tokenizer)
    batch = collate([rows[i] for i in range(4)])
    support_batch = collate([rows[i] for i in (20, 21)])
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    support_batch = {k: support_batch[k] for k in ("input_ids", "attention_mask", "labels")}

    settings = GastSettings(k=2)
    engine = GastEngine(model, settings).attach()
    support = support_gradients(model, support_batch, engine.block_parameters)
    with engine.step(4, support, step_seed=3):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        per_sample_loss(out.logits, batch["labels"]).mean().backward()
    grads = {id(p): p.grad.detach().clone() for p in model.parameters() if p.requires_grad}
    chosen = [r.chosen for r in sorted(engine.records, key=lambda r: r.group)]
    groups = [g.params for g in engine.groups]
    engine.detach()

    reference_chosen = record_reference_choices(monkeypatch)
    ref = reference_gast_gradients(model, batch, settings, support_batch, 3, groups=groups)
    assert len(chosen) == LAYERS and chosen == reference_chosen
    assert set(ref) == set(grads)
    worst = max(((g - ref[k]).norm() / ref[k].norm()).item() for k, g in grads.items())
    assert worst < 1e-4, worst
    for key, g in grads.items():
        assert torch.allclose(g, ref[key], rtol=1e-3, atol=1e-6), (g - ref[key]).abs().max()

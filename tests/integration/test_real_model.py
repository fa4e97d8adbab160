"""Slow tier: the real embedded model (SmolLM2-135M) trains, and the loss drops.

Run with ``make test-integration`` (``pytest -m integration``).
"""

from __future__ import annotations

import pytest
import torch

from gastune.training import DataConfig, ModelConfig
from gastune.training.run import train
from tests.helpers import short_run

pytestmark = pytest.mark.integration


DATA = DataConfig(tasks="boolq,arc_easy", per_task=16, cutoff_len=128)


@pytest.mark.parametrize("method", ["lora", "gast"])
def test_real_model_trains_and_loss_drops(method, tmp_path):
    config = short_run(tmp_path / method, method)
    result = train(ModelConfig(lora_r=8, lora_alpha=16, lora_dropout=0.0), DATA, config)
    losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    # the answer format is learnt quickly: the last steps' loss is clearly below the first steps'
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "LoRA B starts at zero and must have moved"
    assert (tmp_path / method / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("tuner", ["series", "parallel"])
def test_real_model_trains_bottleneck_adapters_with_gast(tuner, tmp_path):
    from gastune.models import load_model
    from gastune.tuners import bottleneck_layers, load_bottleneck

    out = tmp_path / tuner
    config = short_run(out, "gast")
    result = train(ModelConfig(tuner=tuner, bottleneck_size=64), DATA, config)
    losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    layers = bottleneck_layers(result.model)
    assert len(layers) == 30 * (2 if tuner == "parallel" else 1)  # SmolLM2-135M: 30 blocks
    assert all(layer.adapter_up.weight.abs().sum() > 0 for layer in layers.values()), "up starts at zero"
    loaded = load_bottleneck(load_model("smollm2-135m"), out)
    for name, param in result.model.named_parameters():
        if ".adapter_" in name:
            assert torch.equal(loaded.get_parameter(name), param.detach().cpu())

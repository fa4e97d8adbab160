"""Series and Parallel bottleneck adapters (gastune.tuners): placement, forward, identity at
init, bad input, save/load, merge — on tiny Llama, Qwen2 and GPT-2 (Conv1D) models."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from gastune.errors import GastuneError
from gastune.models import trainable_by_block
from gastune.training.adapters import apply_adapter
from gastune.training.config import ModelConfig
from gastune.tuners import (
    BottleneckConfig,
    BottleneckLayer,
    apply_bottleneck,
    bottleneck_layers,
    load_bottleneck,
    merge_bottleneck,
    save_bottleneck,
)
from gastune.tuners.bottleneck_io import CONFIG_NAME, WEIGHTS_NAME
from tests.conftest import make_batch, tiny_model

FAMILIES = ("llama", "qwen2", "gpt2")
VARIANTS = (("series", "output"), ("series", "input"), ("parallel", "output"))


def adapted(
    family="llama", kind="series", position="output", randomise=True, layers=3, std=0.2, size=8, **kw
):
    """A tiny model with a bottleneck adapter (``size``); ``randomise`` gives ``up`` non-zero
    weights (``std``) so the adapter changes the output and every adapter tensor has a gradient."""
    model = tiny_model(family, layers=layers)
    apply_bottleneck(model, BottleneckConfig(kind, bottleneck_size=size, position=position, **kw))
    if randomise:
        torch.manual_seed(5)
        for layer in bottleneck_layers(model).values():
            nn.init.normal_(layer.adapter_up.weight, std=std)
    return model


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ---------------------------------------------------------------- 1. the tuners
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind,position", VARIANTS)
def test_untrained_adapter_is_the_identity_and_only_adapters_train(family, kind, position):
    batch = make_batch()
    base = tiny_model(family).eval()
    model = adapted(family, kind, position, randomise=False, scaling="learned").eval()
    assert torch.equal(logits(model, batch), logits(base, batch))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_" in n for n in trainable)
    # grouped by decoder block like every other tuner: each block owns its adapters, none outside
    per_block, outside = trainable_by_block(model)
    assert outside == [] and all(per_block)
    assert sum(len(b) for b in per_block) == len(trainable)


@pytest.mark.parametrize(
    "family,kind,position,expected",
    [
        ("llama", "series", "output", ["mlp.down_proj"]),
        ("llama", "series", "input", ["mlp.gate_proj", "mlp.up_proj"]),  # LLM-Adapters' series script
        ("llama", "parallel", "output", ["mlp.up_proj", "mlp.down_proj"]),  # its parallel script
        ("qwen2", "parallel", "output", ["mlp.up_proj", "mlp.down_proj"]),
        ("gpt2", "series", "output", ["mlp.c_proj"]),  # not attn.c_proj (H → H)
        ("gpt2", "series", "input", ["mlp.c_fc"]),  # not attn.c_attn (H → 3H)
        ("gpt2", "parallel", "output", ["mlp.c_fc", "mlp.c_proj"]),
    ],
)
def test_default_placement_is_found_by_shape(family, kind, position, expected):
    model = adapted(family, kind, position, randomise=False, layers=2)
    names = sorted(bottleneck_layers(model))
    prefix = "transformer.h" if family == "gpt2" else "model.layers"
    assert names == sorted(f"{prefix}.{i}.{e}" for i in range(2) for e in expected)


def reference_output(layer: BottleneckLayer, x: torch.Tensor) -> torch.Tensor:
    """The adapter formulas written out with plain matrices (Conv1D stores W as (in, out))."""
    base = layer.base_layer
    w = base.weight.T if isinstance(base, Conv1D) else base.weight
    b = base.bias if base.bias is not None else 0.0
    d, u, s = layer.adapter_down.weight, layer.adapter_up.weight, layer.scale()

    def a(z):
        return s * torch.tanh(z @ d.T) @ u.T

    if layer.config.kind == "parallel":
        return x @ w.T + b + a(x)
    if layer.config.position == "input":
        return (x + a(x)) @ w.T + b
    h = x @ w.T + b
    return h + a(h)


@pytest.mark.parametrize("base", ["linear", "conv1d"])
@pytest.mark.parametrize("kind,position", VARIANTS)
@pytest.mark.parametrize("scaling", [2, "learned"])
def test_forward_matches_the_formula(base, kind, position, scaling):
    torch.manual_seed(0)
    module = nn.Linear(6, 10) if base == "linear" else Conv1D(10, 6)
    layer = BottleneckLayer(
        module, BottleneckConfig(kind, bottleneck_size=3, position=position, scaling=scaling)
    )
    nn.init.normal_(layer.adapter_up.weight)
    if scaling == "learned":
        with torch.no_grad():
            layer.adapter_scale.weight.fill_(0.7)
    assert layer.scale() == pytest.approx(0.7 if scaling == "learned" else 2.0)
    x = torch.randn(2, 4, 6)
    torch.testing.assert_close(layer(x), reference_output(layer, x))


def test_scaling_accepts_an_int_a_number_as_text_and_learned():
    assert BottleneckConfig("series", scaling=1).scaling == 1.0  # the fork left an int unset
    assert BottleneckConfig("series", scaling="0.5").scaling == 0.5
    assert BottleneckConfig("series", scaling="learned").scaling == "learned"


def test_cli_settings_reach_the_adapter():
    model = tiny_model("llama", layers=2)
    cfg = ModelConfig(tuner="parallel", bottleneck_size=5, non_linearity="relu", adapter_scaling="learned")
    model = apply_adapter(model, tuner="parallel", **cfg.bottleneck_settings())
    layer = next(iter(bottleneck_layers(model).values()))
    assert layer.adapter_down.weight.shape[0] == 5 and isinstance(layer.adapter_act, nn.ReLU)
    assert layer.adapter_scale is not None
    assert layer.adapter_down.weight.dtype == torch.float32


# ---------------------------------------------------------------- 5. bad input
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(bottleneck_size=0), "bottleneck size must be ≥ 1"),
        (dict(bottleneck_size=-3), "bottleneck size must be ≥ 1"),
        (dict(non_linearity="swish2"), "unknown non-linearity 'swish2'"),
        (dict(scaling="big"), "must be a number or 'learned'"),
        (dict(dropout=1.0), "dropout must be in [0, 1)"),
        (dict(target_modules=("nothing_here",)), "'nothing_here' matches nothing"),
        (dict(target_modules=("mlp",)), "is a LlamaMLP; bottleneck adapters wrap"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(GastuneError) as err:
        apply_bottleneck(tiny_model("llama", layers=1), BottleneckConfig("series", **kwargs))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_settings_fail_in_the_model_config_before_any_model_loads():
    with pytest.raises(GastuneError, match="bottleneck size must be ≥ 1"):
        ModelConfig(tuner="series", bottleneck_size=0)
    with pytest.raises(GastuneError, match="unknown non-linearity"):
        ModelConfig(tuner="parallel", non_linearity="cubic")
    ModelConfig(tuner="lora", bottleneck_size=0)  # not a bottleneck tuner: not its business
    with pytest.raises(GastuneError, match="does not train on a quantised base"):
        ModelConfig(tuner="series", load_in_4bit=True)


# ---------------------------------------------------------------- 2. save / load / merge
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "kind,position,scaling", [("series", "output", 1.0), ("parallel", "output", "learned")]
)
def test_save_then_load_gives_the_same_model_and_saves_only_adapters(
    tmp_path, family, kind, position, scaling
):
    batch = make_batch()
    model = adapted(family, kind, position, scaling=scaling).eval()
    save_bottleneck(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert saved and all(".adapter_" in k for k in saved)  # never the base model
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["kind"] == kind and meta["bottleneck_size"] == 8 and meta["modules"]
    loaded = load_bottleneck(tiny_model(family), tmp_path).eval()
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not torch.equal(logits(loaded, batch), logits(tiny_model(family).eval(), batch))


def test_saving_an_incomplete_state_dict_is_refused(tmp_path):
    model = adapted("llama", "series", layers=1)
    partial = {k: v for k, v in model.state_dict().items() if "adapter_up" not in k}
    with pytest.raises(GastuneError, match="lacks 1 adapter tensors"):
        save_bottleneck(model, tmp_path / "out", state_dict=partial)
    assert not (tmp_path / "out").exists()


def test_loading_onto_a_model_of_another_width_is_a_one_line_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    save_bottleneck(adapted("llama", "series", layers=2), tmp_path)
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(GastuneError) as err:
        load_bottleneck(wider, tmp_path)
    assert "trained on a model of another width" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(GastuneError, match="trained on another architecture"):
        load_bottleneck(tiny_model("gpt2", layers=2), tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{}")
    with pytest.raises(GastuneError, match="not a gastune bottleneck adapter config"):
        load_bottleneck(tiny_model("llama", layers=2), tmp_path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kind,position", VARIANTS)
def test_identity_adapters_merge_exactly(family, kind, position):
    batch = make_batch()
    model = adapted(family, kind, position, non_linearity="identity", scaling="learned").eval()
    with torch.no_grad():
        for layer in bottleneck_layers(model).values():
            layer.adapter_scale.weight.fill_(0.6)
    before = logits(model, batch)
    assert not torch.allclose(before, logits(tiny_model(family).eval(), batch), atol=1e-3)
    merge_bottleneck(model)
    assert not bottleneck_layers(model)
    torch.testing.assert_close(logits(model, batch), before, rtol=1e-4, atol=1e-5)


def test_a_non_linear_adapter_refuses_to_merge():
    model = adapted("llama", "parallel")
    with pytest.raises(GastuneError, match="non-linearity tanh cannot be merged"):
        merge_bottleneck(model)
    assert bottleneck_layers(model)  # nothing was half-merged

"""QLoRA: a bitsandbytes 4-bit (NF4) or 8-bit base under LoRA, on the CPU backend.

GAST on the quantised base equals the one-sample-at-a-time reference on that same quantised
model; every method trains its adapters and leaves the quantised base untouched; ``gastune
train --load_in_4bit`` does it end to end; bad flag combinations are one error line.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model

from gastune.engine import GastEngine, GastSettings, per_sample_loss, support_gradients
from gastune.engine.reference import reference_gast_gradients
from gastune.errors import GastuneError
from gastune.methods import METHODS
from gastune.models import load_model, load_tokenizer
from gastune.models.quantization import is_quantized, keep_cpu_weights_unpacked, quantization_config
from gastune.training.adapters import build_peft_config
from tests import helpers
from tests.conftest import make_batch, tiny_llama_for, tiny_model
from tests.helpers import record_reference_choices
from tests.unit._baseline_helpers import trainer_for

bnb = pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")

BITS = {"4bit": dict(load_in_4bit=True), "8bit": dict(load_in_8bit=True)}
QUANTISED = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}


def quantised_lora(tmp_path, bits: str, layers: int = 3, tuner: str = "lora"):
    """The tiny Llama of the unit tests, saved and re-loaded quantised, with LoRA (non-zero B)."""
    folder = tmp_path / "base"
    if not folder.exists():
        tiny_model("llama", layers=layers).save_pretrained(folder)
    model = load_model(str(folder), quantization_config=quantization_config(**BITS[bits]), device_map="cpu")
    keep_cpu_weights_unpacked(model)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == QUANTISED[bits]
    cfg = build_peft_config(model, tuner=tuner, r=4, alpha=8, dropout=0.0)
    cfg.init_lora_weights = False
    model = get_peft_model(model, cfg)
    model.train()
    return model


def quantised_state(model) -> dict[str, torch.Tensor]:
    """The quantised base weights (packed bytes and scales) as stored."""
    return {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" not in n}


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_gast_on_a_quantised_base_equals_the_reference_on_that_model(tmp_path, monkeypatch, bits):
    model = quantised_lora(tmp_path, bits)
    settings = GastSettings(k=3)
    batch, support_batch = make_batch(n=6), make_batch(n=2, seed=9)
    engine = GastEngine(model, settings).attach()
    support = support_gradients(model, support_batch, engine.block_parameters)
    model.zero_grad(set_to_none=True)
    with engine.step(6, support, step_seed=7):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        per_sample_loss(out.logits, batch["labels"]).mean().backward()
    grads = {id(p): p.grad.detach().clone() for p in model.parameters() if p.requires_grad}
    groups = [g.params for g in engine.groups]
    chosen = [r.chosen for r in sorted(engine.records, key=lambda r: r.group)]
    engine.detach()

    reference_chosen = record_reference_choices(monkeypatch)
    ref = reference_gast_gradients(model, batch, settings, support_batch, 7, groups=groups)
    assert chosen == reference_chosen and len(chosen) == 3 and all(len(c) == 3 for c in chosen)
    assert len({tuple(c) for c in chosen}) > 1, "blocks should not all pick the same samples"
    assert set(ref) == set(grads) and len(grads) == 3 * 5 * 2  # 3 blocks × 5 targets × (A, B)
    for key, g in grads.items():
        assert g.abs().sum() > 0
        assert torch.allclose(g, ref[key], rtol=1e-4, atol=1e-6), (g - ref[key]).abs().max()


OPTIONS = dict(
    max_steps=2,
    gast_k=2,
    lisa_layers=1,
    lisa_interval=1,
    rst_layer_fraction=0.5,
    ist_interval=1,
    ist_probe_batch=4,
    fisher_samples=4,
    fisher_layers=1,
)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_its_adapter_on_a_4bit_base(tmp_path, method):
    tuner = "dora" if method == "dora" else "lora"
    model = quantised_lora(tmp_path, "4bit", layers=2, tuner=tuner)
    base, before = quantised_state(model), helpers.trainable(model)
    trainer = trainer_for(method, model=model, **OPTIONS)
    trainer.train()
    assert is_quantized(model)
    after = helpers.trainable(model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed, f"{method}: no adapter tensor moved"
    assert all(torch.isfinite(t).all() for t in after.values())
    assert all(torch.equal(base[n], t) for n, t in quantised_state(model).items()), "the base changed"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)


# ------------------------------------------------------------ through gastune train
def _model_and_data(tmp_path):
    tokenizer = load_tokenizer("smollm2-135m")
    tiny_llama_for(tokenizer, hidden_size=64, layers=2).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Q{i}: ", "completion": f" a{i}"}) + "\n" for i in range(8))
    )
    return str(tmp_path / "model"), str(data)


def _train_argv(model, data, out, *extra):
    return [
        *("train", "--use_cpu", "true", "--model", model, "--data", str(data), "--method", "gast"),
        *("--gast_k", "2", "--gast_support", "batch", "--per_device_train_batch_size", "4"),
        *("--max_steps", "2", "--save_strategy", "no", "--lora_r", "2", "--lora_alpha", "4"),
        *("--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true", *extra),
    ]


def test_gastune_train_load_in_4bit_trains_gast_on_an_nf4_base(tmp_path, capsys):
    from safetensors.torch import load_file

    from gastune.cli.main import main
    from gastune.training import GastuneConfig, ModelConfig
    from gastune.training.run import load_base_model

    model, data = _model_and_data(tmp_path)
    out = tmp_path / "out"
    assert main(_train_argv(model, data, out, "--load_in_4bit", "true")) == 0
    assert "saved the gast adapter" in capsys.readouterr().out
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    saved = json.loads((out / "gastune_config.json").read_text())
    assert saved["model"]["load_in_4bit"] is True
    # what load_base_model builds for these flags: NF4, double quantisation, frozen base
    base = load_base_model(
        ModelConfig(model=model, load_in_4bit=True), GastuneConfig(output_dir=str(out), use_cpu=True)
    )
    assert is_quantized(base)
    q = base.model.layers[0].mlp.down_proj
    assert type(q).__name__ == "Linear4bit" and q.weight.quant_state.quant_type == "nf4"
    assert not any(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--load_in_4bit", "true", "--load_in_8bit", "true"], "--load_in_4bit and --load_in_8bit exclude"),
        (["--load_in_8bit", "true", "--dataloader_drop_last", "true"], None),
    ],
)
def test_bad_quantisation_flags_are_one_error_line(tmp_path, capsys, monkeypatch, flags, message):
    from gastune.cli.main import main

    if message is None:  # bitsandbytes not installed
        import importlib.util

        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a),
        )
        message = "--load_in_8bit needs bitsandbytes, which is not installed: pip install"
    model, data = _model_and_data(tmp_path)
    out = tmp_path / "out"
    capsys.readouterr()  # the model folder's save progress
    assert main(_train_argv(model, data, out, *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (out / "adapter_model.safetensors").exists()


def test_quantisation_config_refuses_both_widths_from_python():
    with pytest.raises(GastuneError, match="exclude each other"):
        quantization_config(load_in_4bit=True, load_in_8bit=True)
    assert quantization_config() is None

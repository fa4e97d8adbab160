"""Every method on the Series and Parallel bottleneck adapters: GAST's fast path against the
one-sample-at-a-time reference, IST's response suppression, each method through the Trainer,
saving/resuming/evaluating, ``gastune train``/``eval``, the bench grid and step_cost.py."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

from gastune.engine import GastEngine, GastSettings
from gastune.errors import GastuneError
from gastune.methods.ist import scalable_modules, suppressed
from gastune.models import find_decoder_blocks
from gastune.tuners import bottleneck_layers, load_bottleneck
from gastune.tuners.bottleneck import linear_shape
from gastune.tuners.bottleneck_io import CONFIG_NAME, WEIGHTS_NAME, load_bottleneck_weights
from tests.helpers import REPO, RecordingCollator, row_dataset, sgd_config, trainable
from tests.unit.test_bottleneck import VARIANTS, adapted, logits, reference_output
from tests.unit.test_engine import assert_matches_reference

METHODS = [
    "dense",
    "gast",
    "ist",
    "rst",
    "lisa",
    "fisher",
    "gast+ist",
    "maxloss",
    "random-half",
    "gradnorm",
    "greats",
]
OPTIONS = dict(
    lisa_layers=2,
    fisher_layers=2,
    fisher_samples=4,
    gast_k=2,
    gast_support_size=2,
    ist_interval=1,
    ist_probe_batch=4,
)


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------- 3. GAST's fast path is exact
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("kind,position", VARIANTS)
def test_gast_engine_equals_the_reference(family, kind, position):
    # std=1: gradients large enough that standardize()'s eps (1e-8) is negligible against the
    # score spread; the engine's scores carry the loss's 1/N, the reference's do not
    model = adapted(family, kind, position, std=1.0).train()
    engine = GastEngine(model)
    # down/up are plain Linear layers: the per-sample-in-backward path, never the replay
    assert len(engine._linear) == 2 * len(bottleneck_layers(model)) and not engine._generic
    engine.detach()
    assert_matches_reference(model, GastSettings(k=3))


@pytest.mark.parametrize("kind", ["series", "parallel"])
def test_gast_engine_equals_the_reference_with_a_learned_scale_per_module(kind):
    model = adapted("llama", kind, scaling="learned", std=1.0).train()
    with torch.no_grad():
        for layer in bottleneck_layers(model).values():
            layer.adapter_scale.weight.fill_(0.8)
    assert_matches_reference(model, GastSettings(k=3, granularity="module"))
    assert_matches_reference(model, GastSettings(k=2, selection="topk"))


# ---------------------------------------------------------------- 3. IST scales the adapter output
@pytest.mark.parametrize("kind,position", VARIANTS)
def test_ist_suppression_scales_the_adapter_output_and_restores_it(kind, position):
    model = adapted("gpt2", kind, position, scaling="learned")
    block = find_decoder_blocks(model).blocks[1]
    modules = scalable_modules(block)
    assert modules and all(m in bottleneck_layers(model).values() for m in modules)
    layer = modules[0]
    x = torch.randn(2, 3, linear_shape(layer.base_layer)[0])
    with torch.no_grad():
        full = layer(x)
        with suppressed(modules, 0.25):
            quarter = layer(x)
        restored = layer(x)
        layer.adapter_scale.weight.mul_(0.25)  # the reference: the same layer with s/4
        expected = reference_output(layer, x)
    torch.testing.assert_close(quarter, expected)
    assert not torch.allclose(quarter, full)
    assert torch.equal(restored, full) and layer.scaling == {"default": 1.0}


# ---------------------------------------------------------------- 3. every method trains
@pytest.mark.parametrize("kind", ["series", "parallel"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_the_adapters_and_nothing_else(method, kind):
    from gastune.training import GastuneTrainer

    model = adapted("llama", kind, layers=4)
    before = copy.deepcopy(model)
    trainer = GastuneTrainer(
        model=model,
        args=sgd_config(method=method, max_steps=2, **OPTIONS),
        train_dataset=row_dataset(),
        data_collator=RecordingCollator(),
    )
    trainer.train()
    moved = [n for n, v in trainable(model).items() if not torch.equal(v, before.get_parameter(n))]
    assert moved and all(".adapter_" in n for n in moved)
    for name, param in model.named_parameters():
        if ".adapter_" not in name:
            assert torch.equal(param, before.get_parameter(name)), f"base weight {name} moved"


# ---------------------------------------------------------------- 2. saved by the Trainer, resumed
def _trainer(model, out, **overrides):
    from gastune.training import GastuneTrainer

    args = sgd_config(method="gast", output_dir=str(out), gast_k=2, gast_support_size=2, **overrides)
    return GastuneTrainer(
        model=model, args=args, train_dataset=row_dataset(), data_collator=RecordingCollator()
    )


def test_the_trainer_saves_only_the_adapter_and_resumes_exactly(tmp_path):
    from gastune.cli.train_cmd import check_adapter_written

    whole = adapted("llama", "parallel", layers=2)
    trainer = _trainer(whole, tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    trainer.save_model()
    check_adapter_written(str(tmp_path / "a"))  # what `gastune train` checks after saving
    ckpt = tmp_path / "a" / "checkpoint-1"
    assert (ckpt / CONFIG_NAME).is_file() and (ckpt / WEIGHTS_NAME).is_file()
    assert not list(ckpt.glob("model*.safetensors"))  # never the base model
    resumed = adapted("llama", "parallel", layers=2)
    _trainer(resumed, tmp_path / "a", max_steps=2).train(resume_from_checkpoint=str(ckpt))
    for name, value in trainable(whole).items():
        torch.testing.assert_close(resumed.get_parameter(name), value)
    other = adapted("llama", "parallel", layers=2, size=4)  # another size: one line
    with pytest.raises(GastuneError, match="another bottleneck size or model width"):
        load_bottleneck_weights(other, ckpt)


# ---------------------------------------------------------------- 2. gastune train, then gastune eval
@pytest.mark.parametrize("kind", ["series", "parallel"])
def test_gastune_train_then_eval_loads_the_adapter(tmp_path, kind, capsys):
    from gastune.cli.eval_cmd import load_model_with_adapter
    from gastune.cli.main import main
    from gastune.models import load_model
    from tests.unit._model_folder import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Q{i}: ", "completion": f" {i}"}) + "\n" for i in range(8))
    )
    out = tmp_path / "out"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--method", "gast", "--tuner", kind]
    argv += ["--bottleneck_size", "4", "--gast_k", "2", "--gast_support", "batch", "--max_steps", "2"]
    argv += ["--per_device_train_batch_size", "4", "--learning_rate", "0.05", "--output_dir", str(out)]
    argv += ["--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((out / CONFIG_NAME).read_text())["kind"] == kind
    assert json.loads((out / "gastune_config.json").read_text())["tuner"] == kind
    model, tokenizer = load_model_with_adapter(str(model_dir), str(out), "cpu")
    assert len(bottleneck_layers(model)) == 2 * (2 if kind == "parallel" else 1)
    batch = tokenizer(["Q1: 1"], return_tensors="pt")
    batch["labels"] = batch["input_ids"]
    base = load_model(str(model_dir)).eval()
    assert not torch.allclose(logits(model, batch), logits(base, batch))  # the trained adapter
    again = load_bottleneck(load_model(str(model_dir)), out).eval()
    assert torch.equal(logits(model, batch), logits(again, batch))  # the Python API agrees
    # export: the adapter's own folder; --merge refuses tanh (not linear), leaving no folder
    assert main(["export", "--adapter", str(out), "--out", str(tmp_path / "exp")]) == 0
    exported = load_bottleneck(load_model(str(model_dir)), tmp_path / "exp").eval()
    assert torch.equal(logits(exported, batch), logits(model, batch))
    assert main(["export", "--adapter", str(out), "--out", str(tmp_path / "m"), "--merge"]) == 2
    assert "non-linearity tanh cannot be merged" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_export_merges_an_identity_adapter_into_a_plain_model_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from gastune.cli.export_cmd import export_adapter
    from gastune.models import load_model
    from gastune.tuners import BottleneckConfig, apply_bottleneck, save_bottleneck
    from tests.unit._model_folder import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "model")
    model = apply_bottleneck(
        load_model(str(model_dir)), BottleneckConfig("series", 4, non_linearity="identity")
    )
    for layer in bottleneck_layers(model).values():
        torch.nn.init.normal_(layer.adapter_up.weight, std=0.5)
    save_bottleneck(model, tmp_path / "adapter")
    export_adapter(tmp_path / "adapter", tmp_path / "merged", merge=True, model=str(model_dir))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    batch = {"input_ids": torch.tensor([[1, 5, 9, 30]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    torch.testing.assert_close(logits(plain, batch), logits(model.eval(), batch), rtol=1e-4, atol=1e-5)


def test_gastune_train_refuses_a_bad_bottleneck_in_one_line(tmp_path, capsys):
    from gastune.cli.main import main

    argv = ["train", "--tuner", "series", "--method", "gast", "--bottleneck_size", "0"]
    assert main([*argv, "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bottleneck size must be ≥ 1" in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 4. comparable
def test_the_bench_grid_accepts_the_bottleneck_tuners():
    from gastune.experiments.grid import build_configs, grid_from_dict

    train = {"tuner": "parallel", "bottleneck_size": 64, "non_linearity": "relu"}
    grid = grid_from_dict(
        {"methods": ["gast", {"name": "series", "method": "gast", "tuner": "series"}], "train": train}
    )
    model_cfgs = [build_configs(grid.settings(run))[0] for run in grid.runs()]
    assert [m.tuner for m in model_cfgs] == ["parallel", "series"]
    assert model_cfgs[0].bottleneck_settings()["bottleneck_size"] == 64
    bad = grid_from_dict({"methods": ["gast"], "train": {**train, "non_linearity": "cubic"}})
    with pytest.raises(GastuneError, match="unknown non-linearity"):
        build_configs(bad.settings(bad.runs()[0]))


@pytest.mark.parametrize("kind", ["series", "parallel"])
def test_step_cost_worker_runs_with_a_bottleneck_tuner(kind, monkeypatch, capsys):
    """One step_cost.py worker, in this process (the parent only runs workers and divides)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("step_cost", REPO / "benchmarks" / "step_cost.py")
    step_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_cost)
    argv = ["step_cost.py", "--worker", "--method", "gast", "--shape", "tiny", "--tuner", kind]
    argv += ["--bottleneck-size", "8", "--batch", "4", "--seq", "8", "--k", "2", "--k-sup", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--steps", "1", "--warmup", "0", "--threads", "1"])
    step_cost.main()
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result["method"] == "gast" and len(result["step_times_s"]) == 1


def test_eval_refuses_a_diverged_bottleneck_adapter_in_one_line(tmp_path):
    from gastune.eval.adapter_checks import check_adapter
    from gastune.tuners import save_bottleneck

    model = adapted("llama", "series", layers=1)
    with torch.no_grad():
        next(iter(bottleneck_layers(model).values())).adapter_up.weight[0, 0] = float("nan")
    save_bottleneck(model, tmp_path / "a")
    with pytest.raises(GastuneError, match="non-finite values"):
        check_adapter(str(tmp_path / "a"), "llama")

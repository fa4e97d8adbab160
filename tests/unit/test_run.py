"""train(): the adapter's initialisation follows the seed."""

from __future__ import annotations

import json

import torch

from gastune.models import load_tokenizer
from gastune.training import DataConfig, GastuneConfig, ModelConfig
from gastune.training.run import train
from tests.conftest import tiny_llama_for


def _tiny_model_dir(tmp_path):
    tokenizer = load_tokenizer("smollm2-135m")
    tiny_llama_for(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text(
        "\n".join(json.dumps({"prompt": f"Q{i}: ", "completion": f"answer {i}"}) for i in range(8))
    )
    return str(tmp_path / "model"), str(data)


def _lora_a(model_dir, data, seed, out):
    config = GastuneConfig(
        output_dir=str(out),
        method="lora",
        max_steps=1,  # B starts at 0, so A's gradient is 0: one step leaves A at its initialisation
        seed=seed,
        use_cpu=True,
        save_strategy="no",
        per_device_train_batch_size=4,
        disable_tqdm=True,
    )
    result = train(ModelConfig(model=model_dir, lora_r=4, lora_alpha=8), DataConfig(data=data), config)
    return {n: p.detach().clone() for n, p in result.model.named_parameters() if "lora_A" in n}


def test_adapter_initialisation_follows_the_seed(tmp_path):
    model_dir, data = _tiny_model_dir(tmp_path)
    a = _lora_a(model_dir, data, 1, tmp_path / "a")
    b = _lora_a(model_dir, data, 1, tmp_path / "b")
    c = _lora_a(model_dir, data, 2, tmp_path / "c")
    assert a and all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_a_tokenizer_larger_than_the_vocabulary_is_one_clear_error(tmp_path, capsys):
    from gastune.cli.main import main

    tokenizer = load_tokenizer("smollm2-135m")
    tiny_llama_for(tokenizer, vocab_size=1000).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "Q: ", "completion": "A"}) + "\n")
    code = main(
        [
            "train",
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(data),
            "--max_steps",
            "1",
            "--output_dir",
            str(tmp_path / "out"),
            "--use_cpu",
            "true",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "49152 tokens but the model's embedding has only 1000 rows" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()

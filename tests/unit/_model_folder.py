"""A tiny local causal-LM folder (2-layer Llama, saved with ``save_pretrained``) with the real
default tokenizer, for tests that go through ``gastune train`` by path."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_llama(folder: Path, poison_words: str | None = None) -> Path:
    """Write the model and tokenizer to ``folder``; the tokens of ``poison_words`` (if any)
    get a +inf embedding, so a record holding them has a NaN loss."""
    from gastune.models import load_tokenizer
    from tests.conftest import tiny_llama_for

    tokenizer = load_tokenizer("smollm2-135m")
    model = tiny_llama_for(
        tokenizer,
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if poison_words:
        poison = set(tokenizer(poison_words, add_special_tokens=False)["input_ids"])
        clean = set(tokenizer("What is 0123456789 plus? . ", add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            model.get_input_embeddings().weight[sorted(poison - clean)] = float("inf")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

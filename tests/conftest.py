"""Shared fixtures: tiny random causal LMs of three families, built in milliseconds."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 100


def tiny_model(family: str = "llama", layers: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        return LlamaForCausalLM(cfg)
    if family == "qwen2":
        cfg = Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        return Qwen2ForCausalLM(cfg)
    if family == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=layers,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(cfg)
    raise ValueError(family)


def make_batch(n: int = 6, t: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    """A right-padded batch with some padding and some prompt tokens masked out of the loss."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    for i in range(n):
        length = t - (i * 3) % (t // 2)
        mask[i, length:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return make_batch()


def tiny_llama_for(tokenizer, hidden_size: int = 32, layers: int = 2, seed: int = 0, **config):
    """A tiny random Llama whose vocabulary matches ``tokenizer`` (e.g. the real SmolLM2 one),
    unless ``vocab_size`` is given."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=config.pop("vocab_size", len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=config.pop("num_attention_heads", 4),
        num_key_value_heads=config.pop("num_key_value_heads", 2),
        **config,
    )
    return LlamaForCausalLM(cfg)

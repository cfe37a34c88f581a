"""transformers checkpoints: load vs the torch state_dict, export -> transformers reload, errors."""

import dataclasses
import functools
import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from models.config import ModelConfig, ModelConfigError
from models.hf_io import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    export_hf_checkpoint,
    load_hf_checkpoint,
    tensor_table,
)

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _model(kind, seed=0, dtype=torch.float32, **overrides):
    """A random tiny model, weights scaled so that logits are far from uniform."""
    torch.manual_seed(seed)
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**(SMALL | overrides)))
    else:
        model = LlamaForCausalLM(LlamaConfig(**(SMALL | overrides)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight")
                    else 0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> (torch model, its save_pretrained directory)."""
    root = tmp_path_factory.mktemp("ckpts")
    # head_dim 32 with 4 heads: N*H != D, so a q/o layout mix-up cannot pass
    mistral = _model("mistral", head_dim=32, sliding_window=4)
    models = {
        "mistral": (mistral, {}),
        "llama_tied": (_model("llama", seed=1, tie_word_embeddings=True), {}),
        "sharded": (mistral, {"max_shard_size": "20KB"}),
        "bf16": (_model("llama", seed=2, dtype=torch.bfloat16), {}),
    }
    out = {}
    for name, (model, kwargs) in models.items():
        model.save_pretrained(root / name, **kwargs)
        out[name] = (model, root / name)
    return out


def _state(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _leaf(params, path):
    for key in path:
        params = params[key]
    return params


def _assert_matches_state_dict(config, params, state):
    for entry in tensor_table(config):
        leaf = np.asarray(_leaf(params, entry.path)).astype(np.float32)
        for i, name in enumerate(entry.names(config.num_hidden_layers)):
            got = leaf[i] if entry.layered else leaf
            np.testing.assert_array_equal(got, entry.to_flax(state[name]), err_msg=name)


@pytest.mark.parametrize("name", ["mistral", "llama_tied", "sharded", "bf16"])
def test_load_matches_state_dict(ckpts, name):
    model, path = ckpts[name]
    assert (path / INDEX_FILE).is_file() == (name == "sharded")
    config, params = load_hf_checkpoint(path)
    assert config == ModelConfig.from_hf_dict(model.config.to_dict())
    assert ("lm_head" in params) == (not config.tie_word_embeddings)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    _assert_matches_state_dict(config, params, _state(model))


def test_layout_acts_like_torch_linear(ckpts):
    """Independent of the table: our kernels contract like transformers' Linear weights."""
    model, path = ckpts["mistral"]
    config, params = load_hf_checkpoint(path)
    n, h, d = config.num_attention_heads, config.head_dim, config.hidden_size
    state, attn = _state(model), params["layers"]["attn"]
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=d).astype(np.float32), rng.normal(size=n * h).astype(np.float32)
    w_q = state["model.layers.1.self_attn.q_proj.weight"]
    w_o = state["model.layers.1.self_attn.o_proj.weight"]
    w_g = state["model.layers.1.mlp.gate_proj.weight"]
    q = np.einsum("d,dnh->nh", x, attn["q_proj"]["kernel"][1])
    np.testing.assert_allclose(q, (w_q @ x).reshape(n, h), rtol=1e-5, atol=1e-6)
    o = np.einsum("nh,nhd->d", y.reshape(n, h), attn["o_proj"]["kernel"][1])
    np.testing.assert_allclose(o, w_o @ y, rtol=1e-5, atol=1e-6)
    g = x @ params["layers"]["mlp"]["gate_proj"]["kernel"][1]
    np.testing.assert_allclose(g, w_g @ x, rtol=1e-5, atol=1e-6)


def test_bfloat16_loading(ckpts):
    model, path = ckpts["bf16"]
    config, params = load_hf_checkpoint(path, dtype="bfloat16")
    assert all(x.dtype == ml_dtypes.bfloat16 for x in jax.tree.leaves(params))
    _assert_matches_state_dict(config, params, _state(model))
    # a float32 checkpoint cast on load rounds like torch's .to(bfloat16)
    model, path = ckpts["mistral"]
    config, params = load_hf_checkpoint(path, dtype="bfloat16")
    rounded = {k: v.to(torch.bfloat16).float().numpy() for k, v in model.state_dict().items()}
    _assert_matches_state_dict(config, params, rounded)


@pytest.mark.parametrize("name", ["mistral", "llama_tied"])
def test_export_roundtrip_through_transformers(ckpts, tmp_path, name):
    model, path = ckpts[name]
    config, params = load_hf_checkpoint(path)
    out = export_hf_checkpoint(params, config, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                     SINGLE_FILE]
    assert ModelConfig.from_json(out / "config.json") == config
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is type(model)
    want, got = model.state_dict(), reloaded.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_export_sharded_bfloat16(ckpts, tmp_path):
    model, path = ckpts["bf16"]
    config, params = load_hf_checkpoint(path, dtype="bfloat16")
    out = export_hf_checkpoint(params, config, tmp_path / "export", dtype="bfloat16",
                               max_shard_size=20_000)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / f).is_file() for f in shards)
    assert not (out / SINGLE_FILE).exists()
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / shards[0]).values())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    _, again = load_hf_checkpoint(out, dtype="bfloat16")
    jax.tree.map(np.testing.assert_array_equal, again, params)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<pad> <s> </s> <unk> hello world how are you".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    return tok


def test_export_with_tokenizer(ckpts, tmp_path):
    from transformers import AutoTokenizer

    config, params = load_hf_checkpoint(ckpts["llama_tied"][1])
    tok = _tiny_tokenizer()
    out = export_hf_checkpoint(params, config, tmp_path / "export", tokenizer=tok)
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded("hello you how")["input_ids"] == tok("hello you how")["input_ids"]
    assert reloaded.chat_template == tok.chat_template


def test_export_is_atomic(ckpts, tmp_path):
    config, params = load_hf_checkpoint(ckpts["mistral"][1])

    class Broken:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        export_hf_checkpoint(params, config, tmp_path / "export", tokenizer=Broken())
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary directory
    export_hf_checkpoint(params, config, tmp_path / "export", max_shard_size="20KB")
    with pytest.raises(RuntimeError, match="disk full"):  # a failed re-export keeps the old one
        export_hf_checkpoint(params, config, tmp_path / "export", tokenizer=Broken())
    assert (tmp_path / "export" / INDEX_FILE).is_file()
    export_hf_checkpoint(params, config, tmp_path / "export")  # replaces, leaving no stale shard
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "config.json", "generation_config.json", SINGLE_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_load_errors(ckpts, tmp_path):
    src = ckpts["mistral"][1]
    with pytest.raises(CheckpointError, match="checkpoint directory not found") as e:
        load_hf_checkpoint(tmp_path / "absent")
    _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelConfigError, match="config file not found"):
        load_hf_checkpoint(tmp_path / "empty")

    def variant(name, config_edit=None, tensors_edit=None):
        d = shutil.copytree(src, tmp_path / name)
        if config_edit:
            cfg = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps(config_edit(cfg)))
        if tensors_edit:
            tensors = load_file(d / SINGLE_FILE)
            tensors_edit(tensors)
            save_file(tensors, d / SINGLE_FILE, metadata={"format": "pt"})
        return d

    with pytest.raises(ModelConfigError, match="unsupported model_type 'gpt2'; supported: mistral"):
        load_hf_checkpoint(variant("gpt2", config_edit=lambda c: c | {"model_type": "gpt2"}))
    no_weights = variant("bin")
    (no_weights / SINGLE_FILE).rename(no_weights / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no model.safetensors .*\.bin weights"):
        load_hf_checkpoint(no_weights)

    name = "model.layers.1.self_attn.k_proj.weight"
    wrong = variant("shape", tensors_edit=lambda t: t.update({name: torch.zeros(16, 64)}))
    with pytest.raises(CheckpointError) as e:
        load_hf_checkpoint(wrong)
    assert f"tensor {name} has shape [16, 64], but the config implies [64, 64]" in _one_line(e)
    missing = variant("missing", tensors_edit=lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\): model.norm.weight$"):
        load_hf_checkpoint(missing)
    extra = variant("extra", tensors_edit=lambda t: t.update({
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16),  # ignored
        "model.layers.0.self_attn.q_proj.bias": torch.ones(128)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor\(s\) .*: .*q_proj.bias$"):
        load_hf_checkpoint(extra)
    with pytest.raises(CheckpointError, match="dtype 'float16' is not supported"):
        load_hf_checkpoint(src, dtype="float16")


def test_export_errors(ckpts, tmp_path):
    config, params = load_hf_checkpoint(ckpts["mistral"][1])
    tied = dataclasses.replace(config, tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match="lm_head/kernel .*tie_word_embeddings is true"):
        export_hf_checkpoint(params, tied, tmp_path / "a")
    bad = {**params, "final_norm": {"scale": np.ones(3, np.float32)}}
    with pytest.raises(CheckpointError, match=r"final_norm/scale has shape \[3\], .* \[64\]"):
        export_hf_checkpoint(bad, config, tmp_path / "b")
    with pytest.raises(CheckpointError, match="max_shard_size='lots'"):
        export_hf_checkpoint(params, config, tmp_path / "c", max_shard_size="lots")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["mistral", "llama_tied"])
def test_logits_parity_after_export(ckpts, tmp_path, name):
    """load -> export -> transformers: same logits as our forward (levanter's parity test)."""
    from models import forward

    config, params = load_hf_checkpoint(ckpts[name][1])
    reloaded = AutoModelForCausalLM.from_pretrained(
        export_hf_checkpoint(params, config, tmp_path / "export")
    ).eval()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (2, 10))
    mask = np.ones((2, 10), np.int32)
    mask[1, :3] = 0  # left padding: longer than the mistral window of 4
    ours = jax.jit(functools.partial(forward, config=config))(params, tokens, mask)
    with torch.no_grad():
        theirs = reloaded(
            input_ids=torch.from_numpy(tokens),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(np.maximum(mask.cumsum(-1) - 1, 0)),
        ).logits.numpy()
    valid = mask.astype(bool)
    assert np.abs(np.asarray(ours)[valid] - theirs[valid]).max() < 1e-4

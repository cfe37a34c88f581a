"""The Flax decoder against transformers' PyTorch Mistral/Llama (levanter's test shape)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models import (
    ModelConfig,
    ModelConfigError,
    decode_step,
    forward,
    init_params,
    logical_axes,
    prefill,
)
from models.hf_io import load_hf_checkpoint

TOL = 1e-4


def tiny_hf(kind="mistral", **overrides):
    torch.manual_seed(0)
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=10000.0,
    )
    common.update(overrides)
    if kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    return model.eval()


def to_flax(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    return load_hf_checkpoint(tmp_path)


def batch(seed=0, b=3, t=16, vocab=128, pads=(0, 5, 9)):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, (b, t))
    mask = np.ones((b, t), np.int64)
    for row, p in enumerate(pads):
        mask[row, :p] = 0  # left padding
    return tokens, mask


def torch_logits(model, tokens, mask):
    with torch.no_grad():
        return model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()


CASES = {
    "mistral-gqa-window-untied": ("mistral", dict(sliding_window=6, tie_word_embeddings=False)),
    "mistral-mha-tied": (
        "mistral",
        dict(num_key_value_heads=4, sliding_window=None, tie_word_embeddings=True),
    ),
    "llama-gqa-tied-theta": ("llama", dict(tie_word_embeddings=True, rope_theta=100000.0)),
    "llama-rope-llama3": (
        "llama",
        dict(
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            )
        ),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    kind, overrides = CASES[case]
    hf = tiny_hf(kind, **overrides)
    config, params = to_flax(hf, tmp_path)
    tokens, mask = batch()
    want = torch_logits(hf, tokens, mask)
    got = np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(mask), config=config))
    assert got.dtype == np.float32
    diff = np.abs(want - got) * mask[..., None]  # padded positions carry no meaning
    assert diff.max() < TOL, f"{case}: max abs diff {diff.max()}"


def test_left_padding_does_not_change_real_tokens(tmp_path):
    config, params = to_flax(tiny_hf(sliding_window=4), tmp_path)
    tokens, _ = batch(b=1, t=10, pads=(0,))
    padded = np.concatenate([np.zeros((1, 5), tokens.dtype), tokens], axis=1)
    mask = np.concatenate([np.zeros((1, 5)), np.ones((1, 10))], axis=1)
    plain = forward(params, jnp.asarray(tokens), jnp.ones((1, 10)), config=config)
    shifted = forward(params, jnp.asarray(padded), jnp.asarray(mask), config=config)[:, 5:]
    np.testing.assert_allclose(plain, shifted, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_cached_decode_reproduces_full_forward(window, tmp_path):
    config, params = to_flax(tiny_hf(sliding_window=window), tmp_path)
    tokens, mask = batch(t=14, pads=(0, 3, 5))
    full = np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(mask), config=config))
    start = 7
    logits, cache = prefill(
        params,
        jnp.asarray(tokens[:, :start]),
        jnp.asarray(mask[:, :start]),
        config=config,
        max_len=tokens.shape[1],
    )
    if window is not None:
        assert cache.num_slots == window  # the cache never outgrows the window
    np.testing.assert_allclose(logits, full[:, start - 1], atol=TOL)
    step = jax.jit(lambda p, t, c: decode_step(p, t, c, config=config))
    for t in range(start, tokens.shape[1]):
        logits, cache = step(params, jnp.asarray(tokens[:, t]), cache)
        np.testing.assert_allclose(logits, full[:, t], atol=TOL, err_msg=f"position {t}")


def test_no_gradient_from_future_tokens():
    config = ModelConfig.from_hf_dict(tiny_hf().config.to_dict())
    params = init_params(config, jax.random.key(0))
    tokens = jnp.arange(8)[None] % config.vocab_size
    emb = params["embed"]["embedding"]

    def logit_at_3(embedding):
        p = {**params, "embed": {"embedding": embedding}}
        return forward(p, tokens, jnp.ones((1, 8)), config=config)[0, 3].sum()

    g = jax.jit(jax.grad(logit_at_3))(emb)  # one program, not op by op
    future = np.asarray(tokens[0, 4:])
    past = np.asarray(tokens[0, :4])
    assert np.abs(np.asarray(g)[future]).max() == 0.0
    assert np.abs(np.asarray(g)[past]).max() > 0.0


def test_bfloat16_compute_gives_float32_logits_close_to_float32(tmp_path):
    config, params = to_flax(tiny_hf(), tmp_path)
    tokens, mask = batch()
    ref = forward(params, jnp.asarray(tokens), jnp.asarray(mask), config=config)
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out = forward(
        bf16_params, jnp.asarray(tokens), jnp.asarray(mask), config=config, dtype="bfloat16"
    )
    assert out.dtype == jnp.float32
    err = np.abs(np.asarray(out - ref)) * mask[..., None]
    assert 0 < err.max() < 0.1


def test_remat_gives_same_gradients(tmp_path):
    config, params = to_flax(tiny_hf(), tmp_path)
    tokens, mask = batch()

    def loss(p, remat):
        return forward(p, jnp.asarray(tokens), jnp.asarray(mask), config=config, remat=remat).mean()

    g0 = jax.jit(jax.grad(loss), static_argnums=1)(params, "none")  # one program each
    g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, "full")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_every_parameter_has_logical_axes():
    config = ModelConfig.from_hf_dict(tiny_hf(tie_word_embeddings=False).config.to_dict())
    params = init_params(config, jax.random.key(0))
    axes = logical_axes(config)
    flat_p = jax.tree_util.tree_leaves_with_path(params)
    flat_a = dict(
        jax.tree_util.tree_leaves_with_path(
            axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )
    )
    for path, leaf in flat_p:
        spec = flat_a[path]
        assert len(spec) == leaf.ndim and all(isinstance(n, str) for n in spec), (path, spec)
    assert axes["layers"]["attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", "heads", "head_dim"
    )
    assert axes["embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model_type", "gpt2", "unsupported model_type 'gpt2'; supported: mistral, llama"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling type 'yarn'"),
        ("hidden_act", "gelu", "unsupported hidden_act 'gelu'"),
        ("attention_bias", True, "attention_bias=true is not supported"),
    ],
)
def test_config_rejects_what_it_cannot_honour(field, value, message):
    cfg = tiny_hf().config.to_dict()
    cfg[field] = value
    if field == "rope_scaling":
        cfg.pop("rope_parameters", None)
    with pytest.raises(ModelConfigError, match=message.replace("(", r"\(")):
        ModelConfig.from_hf_dict(cfg)


def test_config_round_trips_through_transformers_dict():
    hf = tiny_hf(sliding_window=7)
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    again = ModelConfig.from_hf_dict(transformers.MistralConfig(**config.to_hf_dict()).to_dict())
    assert again == config
    assert config.sliding_window == 7 and config.num_groups == 2

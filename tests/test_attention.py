"""The attention kernels (`models.attention`): the forced XLA `dot_product_attention` path equals
the einsum path under every mask the model builds, and the per-backend choice."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import forward, forward_packed, init_params
from models.attention import attend, choose_attention, current_backend
from optune_jax.packing import pack_batch

from .test_packing import WINDOWED, _with_samples, pairs
from .test_train_step import CONFIG, PROMPT, as_batch

MQA = dataclasses.replace(CONFIG, num_key_value_heads=1)
MHA = dataclasses.replace(CONFIG, num_key_value_heads=4, sliding_window=3)
CONFIGS = {"gqa-window4": WINDOWED, "mqa": MQA, "mha-window3": MHA}


def _padded(seed=0, b=3, t=12, pads=(0, 4, 9)):
    rng = np.random.RandomState(seed)
    mask = (np.arange(t)[None] >= np.asarray(pads)[:, None]).astype(np.int32)  # left padding
    return rng.randint(1, 32, (b, t)).astype(np.int32), mask


@pytest.mark.parametrize("name", CONFIGS)
def test_xla_path_equals_einsum_on_padded_prompts(name):
    """Left-padded rows, causal, GQA/MQA/MHA, with and without a sliding window."""
    config = CONFIGS[name]
    params = init_params(config, jax.random.key(1))
    tokens, mask = _padded()
    run = jax.jit(lambda a: forward(params, tokens, mask, config=config, attention=a),
                  static_argnums=0)
    np.testing.assert_allclose(run("xla"), run("einsum"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [CONFIG, WINDOWED], ids=["full", "window4"])
def test_xla_path_equals_einsum_on_packed_lines(config):
    """Packed segments: prompts as trunks, chosen, rejected and samples as branches."""
    params = init_params(config, jax.random.key(0))
    micro = _with_samples(pairs(k=4, resp=7))
    packed = jax.tree.map(lambda x: x[0], pack_batch(as_batch(micro, 1), prompt_len=PROMPT))
    p = packed.packed
    assert (np.asarray(p.branch) > 1).any()  # more than one branch after a trunk

    run = jax.jit(lambda a: forward_packed(params, p.tokens, p.pos, p.segment, p.branch,
                                           p.logit_at, config=config, attention=a),
                  static_argnums=0)
    np.testing.assert_allclose(run("xla"), run("einsum"), atol=1e-5, rtol=1e-5)


def test_xla_path_gradients_equal_einsum():
    params = init_params(WINDOWED, jax.random.key(2))
    tokens, mask = _padded(seed=3)
    weights = jax.random.normal(jax.random.key(3), (*tokens.shape, WINDOWED.vocab_size))

    def grads(attention):
        def loss(p):
            logits = forward(p, tokens, mask, config=WINDOWED, attention=attention)
            return jnp.sum(jax.nn.log_softmax(logits) * weights * mask[..., None])

        return jax.jit(jax.grad(loss))(params)

    got, want = grads("xla"), grads("einsum")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_kernels_agree_on_any_mask_with_more_keys_than_queries(kv_heads):
    """A prefill after a shared prefix: S = P + T keys, a mask with no structure, rows that
    see nothing (the finite mask value keeps them equal too)."""
    b, t, s, n, h = 2, 5, 9, 4, 8
    ks = jax.random.split(jax.random.key(4), 4)
    q = jax.random.normal(ks[0], (b, t, kv_heads, n // kv_heads, h))
    k, v = (jax.random.normal(x, (b, s, kv_heads, h)) for x in ks[1:3])
    allowed = jax.random.bernoulli(ks[3], 0.5, (b, t, s)).at[0, 1].set(False)
    got, want = (
        jax.jit(lambda *x, a=a: attend(*x, attention=a, mask_kind="any"))(q, k, v, allowed)
        for a in ("xla", "einsum")
    )
    assert got.shape == (b, t, n, h)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_auto_is_the_einsum_path_on_this_cpu():
    assert current_backend() == "cpu"
    assert choose_attention("auto", backend="cpu", dtype="bfloat16", mask_kind="causal") == "einsum"
    tokens, mask = _padded()
    params = init_params(CONFIG, jax.random.key(0))
    jaxpr = {a: str(jax.make_jaxpr(lambda p, a=a: forward(p, tokens, mask, config=CONFIG,
                                                          attention=a))(params))
             for a in ("auto", "einsum", "xla")}
    assert jaxpr["auto"] == jaxpr["einsum"] != jaxpr["xla"]


@pytest.mark.parametrize(
    "requested, backend, dtype, mask_kind, want",
    [
        ("auto", "gpu", "bfloat16", "causal", "cudnn"),
        ("auto", "gpu", "float16", "any", "cudnn"),
        ("auto", "gpu", "float32", "causal", "xla"),  # cuDNN's flash kernel: half precision only
        ("auto", "rocm", "bfloat16", "causal", "xla"),  # no cuDNN
        ("auto", "tpu", "bfloat16", "causal", "xla"),
        ("auto", "tpu", "float32", "any", "xla"),
        ("auto", "cpu", "float32", "causal", "einsum"),
        ("auto", "gpu", "bfloat16", "decode", "einsum"),  # one query row: the cache layout
        ("cudnn", "gpu", "bfloat16", "decode", "einsum"),
        ("xla", "cpu", "float32", "causal", "xla"),  # forced
        ("cudnn", "gpu", "float32", "causal", "cudnn"),  # forced: JAX says why it cannot
        ("einsum", "gpu", "bfloat16", "causal", "einsum"),
    ],
)
def test_the_chooser_is_a_function_of_backend_dtype_and_mask(
    requested, backend, dtype, mask_kind, want
):
    assert choose_attention(requested, backend=backend, dtype=dtype, mask_kind=mask_kind) == want


@pytest.mark.parametrize("lengths, head_dim", [((7, 7), 64), ((8, 8), 12), ((8, 8), 256)])
def test_auto_leaves_cudnn_where_its_kernel_refuses_the_shape(lengths, head_dim):
    kw = dict(backend="gpu", dtype="bfloat16", mask_kind="causal")
    assert choose_attention("auto", lengths=(8, 8), head_dim=128, **kw) == "cudnn"
    assert choose_attention("auto", lengths=lengths, head_dim=head_dim, **kw) == "xla"


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="attention='flash'"):
        choose_attention("flash", backend="cpu", dtype="float32", mask_kind="causal")
    with pytest.raises(ValueError, match="mask_kind='padded'"):
        choose_attention("auto", backend="cpu", dtype="float32", mask_kind="padded")

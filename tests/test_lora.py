"""LoRA as pure functions: the update is A @ B, the ensemble merge is the mean of updates."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import ModelConfig, forward, init_params
from models.lora import LoraSpec, init_lora, lora_logical_axes, merge

CONFIG = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8)


@functools.cache
def _params():
    """init_params compiles its layer scan anew on each call (seconds): once for the module."""
    return init_params(CONFIG, jax.random.key(0))


def randomised(lora, seed=1):
    # NumPy draws: jax.random would compile a sampler per leaf shape (seconds each on a CPU)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), lora)


def test_fresh_adapters_change_nothing_and_only_adapters_get_gradients():
    params = _params()
    spec = LoraSpec(rank=4, num_adapters=3)
    lora = init_lora(params, spec, jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, merge(params, lora, spec), params)
    tokens = jnp.arange(6)[None] % 40

    def loss(lora):
        return forward(merge(params, lora, spec), tokens, jnp.ones((1, 6)), config=CONFIG).mean()

    grads = jax.jit(jax.grad(loss))(randomised(lora))  # one program, not op by op
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name, n_in", [("q_proj", 1), ("o_proj", 2), ("down_proj", 1)])
def test_update_is_scaled_a_times_b_per_adapter_and_the_merge_is_their_mean(name, n_in):
    params = _params()
    spec = LoraSpec(rank=3, alpha=6.0, targets=(name,), num_adapters=4)
    lora = randomised(init_lora(params, spec, jax.random.key(2)))
    module = "mlp" if name.endswith(("gate_proj", "up_proj", "down_proj")) else "attn"
    w = np.asarray(params["layers"][module][name]["kernel"])
    a, b = (np.asarray(lora[name][k]) for k in "ab")
    deltas = []
    for e in range(4):
        layers = []
        for layer in range(CONFIG.num_hidden_layers):
            a2 = a[e, layer].reshape(-1, 3)  # flatten input axes: [in, r]
            b2 = b[e, layer].reshape(3, -1)  # flatten output axes: [r, out]
            layers.append((2.0 * a2 @ b2).reshape(w.shape[1:]))
        deltas.append(np.stack(layers))
        got = merge(params, lora, spec, adapter=e)["layers"][module][name]["kernel"]
        np.testing.assert_allclose(got, w + deltas[-1], rtol=1e-5, atol=1e-5)
    mean = merge(params, lora, spec)["layers"][module][name]["kernel"]
    np.testing.assert_allclose(mean, w + np.mean(deltas, axis=0), rtol=1e-5, atol=1e-5)


def test_logical_axes_match_adapter_ranks_and_bad_specs_are_refused():
    params = _params()
    spec = LoraSpec(rank=2, num_adapters=2)
    lora = init_lora(params, spec, jax.random.key(0))
    axes = lora_logical_axes(CONFIG, spec)
    for name in spec.targets:
        for k in "ab":
            assert len(axes[name][k]) == lora[name][k].ndim
    assert tuple(axes["q_proj"]["a"]) == ("adapters", "layers", "embed", "lora_rank")
    with pytest.raises(ValueError, match="unknown LoRA target 'qkv'"):
        LoraSpec(targets=("qkv",))

"""Mesh, rules and the sharded train step on 8 simulated CPU devices (tests/conftest.py)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from models import ModelConfig, init_params
from optune_jax import sharding
from optune_jax.optimizer import TrainState, create_state, make_optimizer
from optune_jax.run.checkpoint import Checkpoints
from optune_jax.train_step import LossChoice, PolicySpec, train_step
from tests.test_train_step import as_batch, pairs

CONFIG = ModelConfig(
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
PROMPT = 5
MICRO = 8  # pairs per micro-batch: divisible by every data-parallel size below
# RMSprop's first step is ~10 lr × sign(g) down to |g| ~ 1e-7 (torch's eps, outside the root):
# such a tiny gradient summed in another order moves its weight by up to ~3e-3 lr, so a small
# lr keeps that under the atol below (each weight still moves by ~1e-3, 1000 × atol)
OPT = make_optimizer(
    name="rmsprop",
    learning_rate=1e-4,
    total_steps=10,
    warmup_ratio=0.0,
    weight_decay=0.0,
    max_grad_norm=1.0,
)


def _step_fn(dtype="float32"):
    return functools.partial(
        train_step,
        optimizer=OPT,
        policy=PolicySpec(CONFIG, dtype=dtype, remat="full"),
        loss=LossChoice.from_values("wdpo", dict(beta=0.1, beta2=2.0)),
        prompt_len=PROMPT,
    )


def _batch():
    return as_batch(pairs(k=2 * MICRO), 2)  # 2 micro-batches: accumulation inside the step


@functools.cache
def _host_params():
    return jax.device_get(jax.jit(functools.partial(init_params, CONFIG))(jax.random.key(0)))


@functools.cache
def _single_device():
    params = _host_params()
    state = TrainState(jnp.zeros((), jnp.int32), params, OPT.init(params))
    return jax.device_get(jax.jit(_step_fn())(state, _batch()))


def _sharded_state(shape):
    layout = sharding.Layout(sharding.make_mesh(shape), sharding.make_rules())
    params = jax.device_put(_host_params(), sharding.param_shardings(CONFIG, layout))
    return layout, *create_state(params, OPT, layout.mesh)


def _sharded_step(shape, dtype="float32"):
    layout, state, shardings = _sharded_state(shape)
    step = sharding.jit_train_step(
        _step_fn(dtype),
        layout,
        state_shardings=shardings,
        batch_sharding=sharding.batch_sharding(layout, MICRO, axis=1),
    )
    return step(state, _batch(), None)


def _kernel(params, module, name):
    return params["layers"][module][name]["kernel"]


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_the_single_device_step(shape):
    want_state, want = _single_device()
    state, metrics = _sharded_step(shape)
    for key in ("loss", "grad_norm", "margin"):
        np.testing.assert_allclose(metrics[key], want[key], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        jax.device_get(state),
        want_state,
    )
    # weights stay sharded across steps (ZeRO-3 over fsdp, Megatron over tensor)
    data, fsdp, tensor = shape
    q = _kernel(state.params, "attn", "q_proj")  # [L, D, N, H]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert _kernel(state.params, "mlp", "down_proj").sharding.spec == P(None, "tensor", "fsdp")
    assert state.params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert q.addressable_shards[0].data.shape == (2, 32 // fsdp, 4 // tensor, 8)
    nu = jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "nu"))
    nu_q = next(s for s in nu if hasattr(s, "nu")).nu["layers"]["attn"]["q_proj"]["kernel"]
    assert nu_q.sharding == q.sharding  # optimizer moments sharded like their parameters
    assert metrics["loss"].sharding.is_fully_replicated


def test_bf16_compute_keeps_float32_master_weights():
    _, want = _single_device()
    state, metrics = _sharded_step((2, 2, 2), dtype="bfloat16")
    floats = [x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(floats) > 10 and set(floats) == {np.dtype("float32")}  # weights, moments
    np.testing.assert_allclose(metrics["loss"], want["loss"], rtol=2e-2)
    np.testing.assert_allclose(metrics["grad_norm"], want["grad_norm"], rtol=5e-2)


def test_random_init_is_created_in_its_shards():
    layout = sharding.Layout(sharding.make_mesh((1, 4, 2)), sharding.make_rules())
    params = sharding.init_sharded_params(CONFIG, jax.random.key(0), layout)
    assert _kernel(params, "mlp", "gate_proj").sharding.spec == P(None, "fsdp", "tensor")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), _host_params())


def test_a_checkpoint_saved_on_one_mesh_restores_on_another(tmp_path):
    *_, state, _ = _sharded_state((2, 4, 1))
    state = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, state)  # not init
    ckpt = Checkpoints(tmp_path / "ckpt")
    ckpt.save(0, state=state, host={"x": np.arange(3)}, meta={})
    *_, like, _ = _sharded_state((1, 2, 4))
    restored, host, _ = ckpt.restore(0, state_like=like, host_like={"x": np.zeros(3, int)})
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
    assert jax.tree.map(lambda x: x.sharding, restored) == jax.tree.map(lambda x: x.sharding, like)
    assert _kernel(restored.params, "attn", "o_proj").sharding.spec == P(
        None, "tensor", None, "fsdp"
    )
    np.testing.assert_array_equal(host["x"], np.arange(3))


def test_dims_the_mesh_does_not_divide_use_fewer_axes():
    layout = sharding.Layout(sharding.make_mesh((2, 4, 1)), sharding.make_rules())
    assert sharding.batch_sharding(layout, 16, axis=1).spec == P(None, ("data", "fsdp"))
    assert sharding.batch_sharding(layout, 4).spec == P("data")  # 4 rows on 8 devices
    assert sharding.batch_sharding(layout, 1).spec == P(None)
    layout = sharding.Layout(sharding.make_mesh((1, 2, 4)), layout.rules)
    specs = sharding.param_shardings(CONFIG, layout)  # 2 kv heads on 4 tensor devices
    assert _kernel(specs, "attn", "k_proj").spec == P(None, "fsdp", None, None)
    assert _kernel(specs, "attn", "q_proj").spec == P(None, "fsdp", "tensor", None)


def test_rules_overrides_and_mesh_shapes():
    rules = dict(
        sharding.make_rules([("embed", None), ("batch", "data"), ("mlp", "fsdp", "tensor")])
    )
    assert rules["embed"] is None and rules["batch"] == "data"
    assert rules["mlp"] == ("fsdp", "tensor") and rules["heads"] == "tensor"
    with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
        sharding.make_rules([("hidden", "fsdp")])
    with pytest.raises(ValueError, match="mesh axes"):
        sharding.make_rules([("embed", "model")])
    assert sharding.resolve_shape((2, -1, 2), 8) == (2, 2, 2)
    assert sharding.make_mesh((1, -1, 1)).shape == {"data": 1, "fsdp": 8, "tensor": 1}
    assert sharding.make_mesh((1, 2, 1)).devices.size == 2  # fixed sizes: the first devices
    for bad in [(3, -1, 1), (2, 2, 1), (-1, -1, 1), (0, 8, 1)]:
        with pytest.raises(ValueError, match="mesh shape"):
            sharding.resolve_shape(bad, 8)


@pytest.mark.parametrize("shape, heads, kv_heads", [((1, 8, 1), 16, 8), ((2, 2, 2), 4, 2)])
def test_the_decode_layout_samples_what_one_device_samples(shape, heads, kv_heads):
    # the Generator's path: weights moved once from the training layout into the decode
    # layout (heads, kv heads, mlp, vocab over fsdp x tensor), rows over data
    from sampling import SamplingOptions, generate

    config = dataclasses.replace(CONFIG, num_attention_heads=heads, num_key_value_heads=kv_heads)
    host = jax.device_get(jax.jit(functools.partial(init_params, config))(jax.random.key(1)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, config.vocab_size, (4, 6)).astype(np.int32)
    mask = (np.arange(6) >= np.array([[0], [2], [5], [3]])).astype(np.int32)  # left padding
    opts = SamplingOptions(max_new_tokens=6, eos_ids=(1,), pad_id=0, num_samples=2, top_p=0.9)
    ids = np.arange(4, dtype=np.int32)
    run = functools.partial(generate, seed=3, iteration=1, config=config, opts=opts)
    want = jax.device_get(run(host, tokens, mask, ids))

    layout = sharding.Layout(sharding.make_mesh(shape), sharding.make_rules())
    trained = jax.device_put(host, sharding.param_shardings(config, layout))
    params = sharding.to_decode_layout(config, layout, "float32")(trained)
    q = params["layers_0"]["attn"]["q_proj"]["kernel"]  # [D, N, H]: the heads split
    assert q.sharding.spec == P(None, ("fsdp", "tensor"), None)
    k = params["layers_0"]["attn"]["k_proj"]["kernel"]  # one kv head a device (2 on 2 x 2)
    assert k.addressable_shards[0].data.shape[1] == 1
    infer = layout.decoding()  # the same mesh under sharding.INFERENCE_RULES
    put = lambda x: jax.device_put(x, sharding.batch_sharding(infer, len(x)))
    with sharding.rules_context(infer):
        got = jax.device_get(run(params, put(tokens), put(mask), put(ids)))
    np.testing.assert_array_equal(got.tokens_BSY, want.tokens_BSY)
    np.testing.assert_array_equal(got.lengths_BS, want.lengths_BS)
    np.testing.assert_allclose(got.logps_BSY, want.logps_BSY, rtol=1e-5, atol=1e-5)

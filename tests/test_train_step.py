"""The pure train step: accumulation is exact, masked pairs are inert, logps are the model's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from losses import sequence_logps
from models import ModelConfig, forward, init_params
from optune_jax.batch import PairBatch
from optune_jax.optimizer import make_optimizer
from optune_jax.run.errors import RunError
from optune_jax.run.guard import NonFiniteGuard
from optune_jax.train_step import (
    LossChoice,
    PolicySpec,
    TrainState,
    response_logps,
    train_step,
)

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


def pairs(k=4, resp=6, seed=0):
    """k pairs: prompts left-padded to PROMPT columns, responses of different lengths."""
    rng = np.random.RandomState(seed)
    t = PROMPT + resp
    tokens = rng.randint(1, 32, (k, 2, t)).astype(np.int32)
    attn = np.zeros((k, 2, t), np.int32)
    resp_mask = np.zeros((k, 2, t), np.int32)
    for i in range(k):
        p = rng.randint(1, PROMPT + 1)
        attn[i, :, PROMPT - p : PROMPT] = 1
        for s in range(2):
            n = 0 if (i, s) == (0, 1) else rng.randint(1, resp + 1)  # pair 0: an empty response
            attn[i, s, PROMPT : PROMPT + n] = 1
            resp_mask[i, s, PROMPT : PROMPT + n] = 1
    return PairBatch(
        tokens=tokens,
        attn=attn,
        resp=resp_mask,
        ref_logps=rng.randn(k, 2).astype(np.float32) - 5,
        rewards=np.sort(rng.rand(k, 2), axis=1)[:, ::-1].astype(np.float32).copy(),
        pair_mask=np.ones((k,), bool),
    )


def as_batch(arrays, accum):
    return jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), arrays)


def copy(arrays):
    return jax.tree.map(np.copy, arrays)


@functools.cache
def _adamw():
    return make_optimizer(
        name="adamw",
        learning_rate=1e-2,
        total_steps=10,
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=1.0,
    )


@functools.cache
def _jitted_step(loss_name, opt):
    """One jitted step per loss and optimizer: the tests share its compiled programs (a
    compilation takes seconds; the step is pure, so reusing it changes no result)."""
    policy = PolicySpec(CONFIG)
    loss = LossChoice.from_values(loss_name, dict(beta=0.1, beta2=2.0))
    return jax.jit(
        functools.partial(train_step, optimizer=opt, policy=policy, loss=loss, prompt_len=PROMPT)
    )


@functools.cache
def _params(seed):
    """init_params compiles its layer scan anew on each call (seconds): once per seed here."""
    return init_params(CONFIG, jax.random.key(seed))


def step_fn(loss_name="wdpo", opt=None):
    """A fresh initial state and the (shared) jitted step."""
    opt = opt or _adamw()
    params = _params(0)
    state = TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))
    return state, _jitted_step(loss_name, opt)


def test_response_logps_match_a_direct_full_sequence_computation():
    arrays = pairs()
    params = _params(0)
    tok = arrays.tokens.reshape(8, -1)
    attn = arrays.attn.reshape(8, -1)
    resp = arrays.resp.reshape(8, -1)
    got = response_logps(params, tok, attn, resp, policy=PolicySpec(CONFIG), prompt_len=PROMPT)
    logits = forward(params, jnp.asarray(tok), jnp.asarray(attn), config=CONFIG)
    want = sequence_logps(logits[:, :-1], jnp.asarray(tok[:, 1:]), jnp.asarray(resp[:, 1:]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    empty = resp.sum(-1) == 0
    assert empty.any() and np.all(np.asarray(got)[empty] == 0)


@pytest.mark.parametrize("loss_name", ["wdpo", "ipo"])
def test_gradient_accumulation_equals_one_big_batch(loss_name):
    arrays = pairs(k=8)
    arrays.pair_mask[[1, 6]] = False  # uneven counted pairs per micro-batch
    sgd = optax.sgd(1.0)  # update = -gradient: compares the accumulated gradient itself
    state, step = step_fn(loss_name, sgd)
    big, m_big = step(state, as_batch(arrays, 1))
    state, step = step_fn(loss_name, sgd)
    acc, m_acc = step(state, as_batch(arrays, 4))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), big.params, acc.params
    )
    for key in ("loss", "margin", "accuracy", "grad_norm"):
        np.testing.assert_allclose(m_big[key], m_acc[key], rtol=1e-5, atol=1e-6)
    assert float(m_acc["num_pairs"]) == 6


def test_masked_pairs_do_not_change_the_update():
    arrays = pairs(k=4)
    state, step = step_fn()
    ref, _ = step(state, as_batch(arrays, 2))
    noisy = copy(arrays)
    noisy.pair_mask[3] = False
    noisy.tokens[3] = 7
    noisy.rewards[3] = [1e6, -1e6]
    state, step = step_fn()
    a, _ = step(state, as_batch(noisy, 2))
    three = jax.tree.map(lambda x: np.concatenate([x[:3], x[:1]]), arrays)
    three.pair_mask[3] = False
    state, step = step_fn()
    b, _ = step(state, as_batch(three, 2))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a.params, b.params)
    assert not all(
        jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.allclose(x, y)), ref.params, a.params))
    )


def test_behavior_reference_gives_log2_dpo_loss_at_the_first_step():
    # reference = the policy itself (π_t, design §3): margins are 0, DPO loss is log 2
    arrays = pairs(k=4)
    state, step = step_fn("dpo")
    flat = [x.reshape(8, -1) for x in (arrays.tokens, arrays.attn, arrays.resp)]
    ref = response_logps(state.params, *flat, policy=PolicySpec(CONFIG), prompt_len=PROMPT)
    arrays = arrays.replace(ref_logps=np.asarray(ref).reshape(4, 2))
    _, metrics = step(state, as_batch(arrays, 2))
    np.testing.assert_allclose(metrics["loss"], np.log(2), rtol=1e-5)
    np.testing.assert_allclose(metrics["margin"], 0.0, atol=1e-5)


def test_repeated_steps_raise_the_margin():
    arrays = pairs(k=4)
    state, step = step_fn("dpo")
    margins = []
    for _ in range(5):
        state, metrics = step(state, as_batch(arrays, 1))
        margins.append(float(metrics["margin"]))
    assert margins[-1] > margins[0]
    assert int(state.step) == 5


def _equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def test_a_non_finite_loss_leaves_the_state_as_it_was_then_training_goes_on():
    # issue 20: a NaN (here a reference logp) must not reach the parameters or Adam's moments
    good = pairs(k=4)
    bad = copy(good)
    bad.ref_logps[2, 0] = np.nan
    state, step = step_fn()
    before = jax.device_get(state)
    state, metrics = step(state, as_batch(bad, 2))
    assert float(metrics["skipped"]) == 1.0 and np.isnan(metrics["loss"])
    assert _equal(jax.device_get(state), before)  # parameters, optimizer state, step count
    state, metrics = step(state, as_batch(good, 2))
    assert float(metrics["skipped"]) == 0.0 and int(state.step) == 1
    assert not _equal(state.params, before.params)


def test_an_update_that_overflows_is_skipped():
    # learning rate 1e38: the gradient is finite but Adam's first update is ±1e38 per weight
    opt = make_optimizer(name="adamw", learning_rate=1e38, total_steps=10, warmup_ratio=0.0,
                         weight_decay=0.0, max_grad_norm=None)
    state, step = step_fn(opt=opt)
    before = jax.device_get(state)
    state, metrics = step(state, as_batch(pairs(k=4), 2))
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    assert float(metrics["skipped"]) == 1.0
    assert _equal(jax.device_get(state), before)


def test_the_guard_stops_on_the_limit_th_skipped_step_in_a_row():
    guard = NonFiniteGuard(3)
    ok = {"skipped": 0.0, "loss": 0.5, "grad_norm": 1.0}
    bad = {"skipped": 1.0, "loss": float("nan"), "grad_norm": float("inf")}
    counted = [guard.counts(m, where="-") for m in (bad, bad, ok, bad, bad)]
    assert counted == [False, False, True, False, False] and guard.in_a_row == 2
    with pytest.raises(RunError) as info:
        guard.counts(bad, where="iteration 4, step 2 of 5")
    message = str(info.value)
    assert message == (
        "iteration 4, step 2 of 5: 3 optimizer steps in a row were skipped, the last for a "
        "non-finite loss (nan) (train.max_skipped_steps=3); the run stops here and its newest "
        "checkpoint stays as it was"
    )
    overflow = {"skipped": 1.0, "loss": 0.5, "grad_norm": 2.0}
    with pytest.raises(RunError, match=r"non-finite update \(loss 0.5 and gradient norm 2 were "):
        guard.counts(overflow, where="-")
    guard = NonFiniteGuard(1)
    with pytest.raises(RunError, match=r"non-finite gradient norm \(inf\)"):
        guard.counts({**ok, "skipped": 1.0, "grad_norm": float("inf")}, where="-")


def test_rpo_alpha_adds_the_chosen_nll_per_token():
    """loss.rpo_alpha: the step's loss is the pairwise loss + α · mean −log π(y_w)/|y_w|,
    checked against the logps of a direct forward pass."""
    from optune_jax.train_step import policy_loss

    arrays = pairs()
    micro = jax.tree.map(jnp.asarray, arrays)
    params = _params(0)
    kw = dict(policy=PolicySpec(CONFIG), prompt_len=PROMPT)
    plain = LossChoice.from_values("wdpo", dict(beta=0.1, beta2=2.0))
    rpo = LossChoice.from_values("wdpo", dict(beta=0.1, beta2=2.0, rpo_alpha=0.5))
    base, _ = policy_loss(params, micro, loss=plain, **kw)
    value, metrics = policy_loss(params, micro, loss=rpo, **kw)
    chosen = [x[:, 0] for x in (arrays.tokens, arrays.attn, arrays.resp)]
    logps = np.asarray(response_logps(params, *chosen, **kw))
    nll = np.mean(-logps / chosen[2].sum(-1))
    assert float(metrics["nll_chosen"]) == pytest.approx(nll, rel=1e-5)
    assert float(value) == pytest.approx(float(base) + 0.5 * nll, rel=1e-5)

"""Pairwise preference losses (design §2), the Bradley–Terry loss and the loss registry."""

import functools
import inspect

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from losses import (
    LOSSES,
    bradley_terry_loss,
    chosen_nll,
    dpo_loss,
    get_loss,
    hinge_loss,
    ipo_loss,
    wdpo_loss,
    wdpo_weights,
)

B = 8
NAMES = ("dpo", "wdpo", "ipo", "hinge")
FNS = {"dpo": dpo_loss, "wdpo": wdpo_loss, "ipo": ipo_loss, "hinge": hinge_loss}
METRIC_KEYS = {"margin", "accuracy", "chosen_implicit_reward", "rejected_implicit_reward", "weight",
               "num_pairs"}
REWARDS = np.linspace(2.0, -1.5, 2 * B, dtype=np.float32).reshape(2, B)  # default (wc, wr)
FAST = settings(max_examples=40, deadline=None)



def _floats(lo, hi):
    # No subnormals: XLA on CPU flushes them to zero, NumPy does not.
    return st.floats(lo, hi, width=32, allow_subnormal=False)


def _arrays(shape, lo, hi):
    return hnp.arrays(np.float32, shape, elements=_floats(lo, hi))


logps_st = _arrays((4, B), -300, 0)
mask_st = hnp.arrays(np.bool_, (B,))
weights_st = _arrays((B,), 0, 2)
rewards_st = _arrays((2, B), -10, 10)
beta_st = st.floats(0.01, 1.0)


def _loss(name, pc, pr, rc, rr, beta=0.1, weights=None, mask=None, rewards=REWARDS, beta2=0.7):
    kwargs = dict(beta=beta, weights=weights, mask=mask)
    if name == "wdpo":
        kwargs.update(chosen_rewards=rewards[0], rejected_rewards=rewards[1], beta2=beta2)
    return FNS[name](pc, pr, rc, rr, **kwargs)


_jit_loss = jax.jit(_loss, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(name, logps, **kwargs):
    """Loss value and gradients w.r.t. (pc, pr, rc, rr)."""
    fn = lambda pc, pr, rc, rr: _loss(name, pc, pr, rc, rr, **kwargs)[0]
    return jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(*logps)


# ---- plain NumPy reference (float64) ---------------------------------------------------------


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_loss(name, logps, beta, weights, mask, rewards=REWARDS, beta2=0.7):
    pc, pr, rc, rr = np.asarray(logps, np.float64)
    h = beta * ((pc - rc) - (pr - rr))
    per_pair = {
        "dpo": np.logaddexp(0.0, -h),
        "wdpo": np.logaddexp(0.0, -h),  # its weight σ(β2·(wc − wr)) multiplies in below
        "ipo": (h / beta - 1.0 / (2.0 * beta)) ** 2,
        "hinge": np.maximum(0.0, 1.0 - h),
    }[name]
    w = np.ones(B) if weights is None else np.asarray(weights, np.float64)
    if name == "wdpo":
        w = w * _np_sigmoid(beta2 * (rewards[0].astype(np.float64) - rewards[1]))
    keep = np.ones(B, bool) if mask is None else np.asarray(mask)
    n = keep.sum()
    mean = lambda x: x[keep].sum() / max(n, 1)
    metrics = {
        "margin": mean(h), "accuracy": mean((h > 0).astype(float)),
        "chosen_implicit_reward": mean(beta * (pc - rc)),
        "rejected_implicit_reward": mean(beta * (pr - rr)), "weight": mean(w), "num_pairs": n,
    }
    return mean(w * per_pair), metrics, h


# ---- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(logps=logps_st, beta=beta_st, weights=weights_st, mask=mask_st)
def test_matches_numpy_reference(name, logps, beta, weights, mask):
    loss, metrics = _jit_loss(name, *logps, beta=beta, weights=weights, mask=mask)
    ref_loss, ref_metrics, h = _np_loss(name, logps, beta, weights, mask)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-4, atol=1e-4)
    assert set(metrics) == METRIC_KEYS
    for key in METRIC_KEYS - {"accuracy"}:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-4, atol=1e-4,
                                   err_msg=key)
    # h within float32 rounding of 0 may fall either side.
    ambiguous = np.sum(mask & (np.abs(h) < 1e-3)) / max(mask.sum(), 1)
    assert abs(metrics["accuracy"] - ref_metrics["accuracy"]) <= ambiguous + 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_metrics_are_float32_scalars(name):
    _, metrics = _loss(name, *np.zeros((4, B), np.float32))
    for value in metrics.values():
        chex.assert_shape(value, ())
        chex.assert_type(value, jnp.float32)


def test_dpo_at_zero_margin_is_log_2():
    logps = np.random.default_rng(0).normal(size=(2, B)).astype(np.float32) * 50
    loss, metrics = dpo_loss(logps[0], logps[1], logps[0], logps[1], beta=0.3)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
    assert metrics["margin"] == 0.0 and metrics["accuracy"] == 0.0


def test_dpo_minus_its_swap_is_minus_the_margin():
    # −log σ(h) + log σ(−h) = −h per pair: the logistic loss, not just any decreasing one.
    pc, pr, rc, rr = np.random.default_rng(1).normal(size=(4, B)).astype(np.float32) * 5
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.5)
    swapped, _ = dpo_loss(pr, pc, rr, rc, beta=0.5)
    np.testing.assert_allclose(loss - swapped, -metrics["margin"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(logps=logps_st, beta=beta_st, shift=hnp.arrays(np.float32, (2, B),
                                                      elements=_floats(-100, 100)))
def test_same_constant_on_policy_and_reference_changes_nothing(name, logps, beta, shift):
    pc, pr, rc, rr = logps
    loss, metrics = _jit_loss(name, pc, pr, rc, rr, beta=beta)
    shifted, shifted_metrics = _jit_loss(name, pc + shift[0], pr + shift[1], rc + shift[0],
                                         rr + shift[1], beta=beta)
    # Only float32 rounding of (p + c) − (r + c) differs: ~1e-4 per log-ratio for |p|, |c| ≤ 400.
    scale = 1.0 + abs(float(loss))
    np.testing.assert_allclose(shifted, loss, atol=2e-3 * scale)
    np.testing.assert_allclose(shifted_metrics["margin"], metrics["margin"], atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(logps=logps_st, beta=beta_st, mask=mask_st)
def test_swapping_chosen_and_rejected_negates_the_margin(name, logps, beta, mask):
    pc, pr, rc, rr = logps
    _, metrics = _jit_loss(name, pc, pr, rc, rr, beta=beta, mask=mask)
    _, swapped = _jit_loss(name, pr, pc, rr, rc, beta=beta, mask=mask)
    # Equal up to float32 rounding (XLA may fuse β·a − β·b into an FMA, which is not antisymmetric).
    np.testing.assert_allclose(swapped["margin"], -metrics["margin"], atol=1e-4)
    np.testing.assert_allclose(swapped["chosen_implicit_reward"],
                               metrics["rejected_implicit_reward"], rtol=1e-6)


# ---- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@FAST
@given(logps=_arrays((4, B), -20, 0), beta=beta_st,
       weights=_arrays((B,), 0.125, 2))
def test_gradient_raises_chosen_and_lowers_rejected(name, logps, beta, weights):
    if name == "ipo":  # IPO regresses to its target: beyond it the signs flip (see the next test).
        pc, pr, rc, rr = logps
        logps = np.stack([np.minimum(pc, pr + rc - rr + 1 / (2 * beta) - 1e-2), pr, rc, rr])
    _, (g_pc, g_pr, g_rc, g_rr) = _value_and_grads(name, logps, beta=beta, weights=weights)
    assert np.all(g_pc <= 0) and np.all(g_pr >= 0)
    assert np.all(g_rc >= 0) and np.all(g_rr <= 0)  # the reference enters with the opposite sign
    if name in ("dpo", "wdpo"):  # |h| ≤ 40 here: σ(−h) > 0 in float32, so strictly
        assert np.all(g_pc < 0) and np.all(g_pr > 0)


@FAST
@given(logps=logps_st, beta=beta_st, weights=weights_st)
def test_wdpo_with_beta2_zero_is_exactly_half_of_dpo(logps, beta, weights):
    dpo, dpo_grads = _value_and_grads("dpo", logps, beta=beta, weights=weights)
    wdpo, wdpo_grads = _value_and_grads("wdpo", logps, beta=beta, weights=weights, beta2=0.0)
    assert wdpo == 0.5 * dpo
    for g_wdpo, g_dpo in zip(wdpo_grads, dpo_grads, strict=True):
        np.testing.assert_array_equal(g_wdpo, 0.5 * g_dpo)


@jax.jit
@functools.partial(jax.grad, argnums=(0, 1))
def _reward_grads(chosen_rewards, rejected_rewards, beta2):
    logps = jnp.array([[-3.0] * B, [-4.0] * B, [-3.5] * B, [-3.5] * B])
    return wdpo_loss(*logps, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                     beta2=beta2)[0]


@FAST
@given(rewards=rewards_st, beta2=st.floats(0.0, 5.0))
def test_wdpo_weight_is_in_half_open_unit_interval_and_constant(rewards, beta2):
    chosen, rejected = np.maximum(rewards[0], rewards[1]), np.minimum(rewards[0], rewards[1])
    weight = wdpo_weights(chosen, rejected, beta2=beta2)
    assert np.all(weight >= 0.5) and np.all(weight <= 1.0)
    # Strictly below 1 while float32 can tell σ(x) from 1 (x < ~16.6).
    assert np.all(weight[beta2 * (chosen - rejected) < 15] < 1.0)
    g_wc, g_wr = _reward_grads(chosen, rejected, beta2)
    assert np.all(g_wc == 0) and np.all(g_wr == 0)


def _one_pair(fn, logratio_margin, beta):
    """The loss of a single pair whose unscaled log-ratio margin is `logratio_margin`."""
    zero = jnp.zeros(1)
    return fn(jnp.reshape(logratio_margin, (1,)), zero, zero, zero, beta=beta)[0]


_one_pair_value_and_grad = jax.jit(jax.value_and_grad(_one_pair, argnums=1), static_argnums=0)
_ipo_curve = jax.jit(jax.vmap(lambda d, beta: _one_pair(ipo_loss, d, beta), in_axes=(0, None)))


@FAST
@given(beta=beta_st)
def test_ipo_is_minimal_at_unscaled_margin_one_over_two_beta(beta):
    target = 1.0 / (2.0 * beta)
    deltas = np.linspace(target - 3.0, target + 3.0, 601, dtype=np.float32)
    pair_losses = _ipo_curve(deltas, beta)
    assert abs(deltas[np.argmin(pair_losses)] - target) <= 0.01
    at_target, grad = _one_pair_value_and_grad(ipo_loss, np.float32(target), beta)
    assert at_target < 1e-6 and abs(grad) < 1e-3
    assert _one_pair_value_and_grad(ipo_loss, np.float32(target + 1), beta)[1] > 0


def test_hinge_is_flat_beyond_margin_one():
    h = np.array([-2.0, 0.0, 0.5, 0.99, 1.01, 3.0], np.float32)
    per_pair = jax.vmap(lambda x: _one_pair(hinge_loss, x, 1.0))(h)
    np.testing.assert_allclose(per_pair, np.maximum(0.0, 1.0 - h), atol=1e-6)
    grads = jax.vmap(jax.grad(lambda x: _one_pair(hinge_loss, x, 1.0)))(h)
    np.testing.assert_array_equal(grads, np.where(h < 1, -1.0, 0.0))


# ---- masks, weights, extremes ---------------------------------------------------------------


def _extreme(seed=0):
    rng = np.random.default_rng(seed)
    logps = (rng.choice([-1.0, 1.0], size=(4, B)) * 1e4).astype(np.float32)
    rewards = (rng.choice([-1.0, 1.0], size=(2, B)) * 1e6).astype(np.float32)
    return logps, rewards


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("all_masked", [False, True])
def test_extreme_inputs_give_finite_losses_and_gradients(name, all_masked):
    logps, rewards = _extreme()
    mask = np.zeros(B, bool) if all_masked else None
    loss, grads = _value_and_grads(name, logps, rewards=rewards, mask=mask, beta2=1.0)
    _, metrics = _loss(name, *logps, rewards=rewards, mask=mask)
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)
    assert all(np.isfinite(v) for v in metrics.values())
    if all_masked:
        assert loss == 0.0 and metrics["num_pairs"] == 0.0
        assert all(np.all(g == 0) for g in grads)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("garbage", [1e4, -1e30, np.inf, np.nan])
def test_masked_pairs_contribute_nothing(name, garbage):
    rng = np.random.default_rng(2)
    logps = rng.normal(size=(4, B)).astype(np.float32) * 10
    weights = rng.uniform(0.5, 2.0, size=B).astype(np.float32)
    mask = np.arange(B) % 3 != 0
    dirty = np.where(mask, logps, np.float32(garbage))
    dirty_rewards = np.where(mask, REWARDS, np.float32(garbage))
    dirty_weights = np.where(mask, weights, np.float32(garbage))

    loss, grads = _value_and_grads(name, dirty, weights=dirty_weights, mask=mask,
                                   rewards=dirty_rewards)
    kept, kept_grads = _value_and_grads(name, logps[:, mask], weights=weights[mask],
                                        rewards=REWARDS[:, mask])
    np.testing.assert_allclose(loss, kept, rtol=1e-6)  # mean over the remaining pairs
    for g, g_kept in zip(grads, kept_grads, strict=True):
        assert np.all(g[~mask] == 0)
        np.testing.assert_allclose(g[mask], g_kept, rtol=1e-5)
    _, metrics = _loss(name, *dirty, weights=dirty_weights, mask=mask, rewards=dirty_rewards)
    assert metrics["num_pairs"] == mask.sum() and all(np.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_vmap_over_leading_axis(name):
    rng = np.random.default_rng(3)
    logps_G4B = rng.normal(size=(3, 4, B)).astype(np.float32) * 10
    mask_GB = rng.random((3, B)) < 0.7
    batched = jax.jit(jax.vmap(lambda logps_4B, m: _loss(name, *logps_4B, mask=m, beta=0.2)))
    loss_G, metrics_G = batched(logps_G4B, mask_GB)
    chex.assert_shape(loss_G, (3,))
    for g in range(3):
        loss, metrics = _loss(name, *logps_G4B[g], mask=mask_GB[g], beta=0.2)
        np.testing.assert_allclose(loss_G[g], loss, rtol=1e-5)
        np.testing.assert_allclose(metrics_G["margin"][g], metrics["margin"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_are_validated(name):
    x = np.zeros(B, np.float32)
    with pytest.raises(AssertionError):
        _loss(name, x, x, x, x[:-1])
    with pytest.raises(AssertionError):
        _loss(name, x[None], x[None], x[None], x[None])
    with pytest.raises(AssertionError):
        _loss(name, x, x, x, x, mask=np.ones(B - 1, bool))


# ---- Bradley–Terry -----------------------------------------------------------------------------


scores_st = _arrays((2, B), -50, 50)


@FAST
@given(scores=scores_st, mask=mask_st)
def test_bradley_terry_matches_numpy_reference(scores, mask):
    loss, metrics = jax.jit(bradley_terry_loss)(scores[0], scores[1], mask=mask)
    margin = scores[0].astype(np.float64) - scores[1]
    n = max(mask.sum(), 1)
    np.testing.assert_allclose(loss, np.logaddexp(0.0, -margin)[mask].sum() / n, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(metrics["margin"], margin[mask].sum() / n, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(metrics["accuracy"], (margin[mask] > 0).sum() / n, atol=1e-6)
    assert metrics["num_pairs"] == mask.sum()


@FAST
@given(scores=scores_st, shift=_floats(-100, 100))
def test_bradley_terry_properties(scores, shift):
    sc, sr = scores
    loss, metrics = bradley_terry_loss(sc, sr)
    shifted, _ = bradley_terry_loss(sc + shift, sr + shift)
    np.testing.assert_allclose(shifted, loss, atol=1e-4 * (1 + abs(float(loss))))
    _, swapped = bradley_terry_loss(sr, sc)
    np.testing.assert_allclose(swapped["margin"], -metrics["margin"], atol=1e-5)
    g_sc, g_sr = jax.grad(lambda a, b: bradley_terry_loss(a, b)[0], argnums=(0, 1))(sc, sr)
    assert np.all(g_sc <= 0) and np.all(g_sr >= 0)
    # strictly, where σ(−margin) is a normal float32 (XLA's CPU flushes subnormals to zero)
    moderate = np.asarray(sc - sr) < 80
    assert np.all(np.asarray(g_sc)[moderate] < 0) and np.all(np.asarray(g_sr)[moderate] > 0)


def test_bradley_terry_zero_margin_extremes_and_empty():
    x = np.linspace(-1e4, 1e4, B, dtype=np.float32)
    np.testing.assert_allclose(bradley_terry_loss(x, x)[0], np.log(2.0), rtol=1e-6)
    for mask in (None, np.zeros(B, bool)):
        loss, grads = jax.value_and_grad(
            lambda a, b, m=mask: bradley_terry_loss(a, b, mask=m)[0], argnums=(0, 1))(x * 100, -x)
        assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)
    assert bradley_terry_loss(x, -x, mask=np.zeros(B, bool))[0] == 0.0


# ---- registry -----------------------------------------------------------------------------------


def test_registry_knows_the_config_names():
    assert set(LOSSES) == {"dpo", "wdpo", "ipo", "hinge", "hypo"}
    assert get_loss("wdpo").needs_rewards and get_loss("hypo").needs_samples
    assert not any(get_loss(n).needs_rewards for n in ("dpo", "ipo", "hinge", "hypo"))


def test_unknown_loss_lists_the_known_names_in_one_line():
    with pytest.raises(ValueError) as info:
        get_loss("dpop")
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_registry_entry_is_callable_the_way_the_training_loop_calls_it(name):
    spec = get_loss(name)
    params = inspect.signature(spec.fn).parameters
    assert set(spec.hyperparams) <= set(params)
    assert ("chosen_rewards" in params) == spec.needs_rewards
    assert ("sample_policy_logps_PS" in params) == spec.needs_samples
    config = {"beta": 0.2, "beta2": 0.5, "lam": 0.3}
    kwargs = {k: config[k] for k in spec.hyperparams}
    if spec.needs_rewards:
        kwargs.update(chosen_rewards=REWARDS[0], rejected_rewards=REWARDS[1])
    if spec.needs_samples:
        kwargs.update(sample_policy_logps_PS=-np.ones((2, 3), np.float32),
                      sample_reference_logps_PS=-np.ones((2, 3), np.float32))
    logps = np.random.default_rng(4).normal(size=(4, B)).astype(np.float32)
    loss, metrics = jax.jit(spec.fn)(*logps, mask=np.ones(B, bool), **kwargs)
    assert np.isfinite(loss) and METRIC_KEYS <= set(metrics)


def test_chosen_nll_is_the_mean_per_token_nll_of_counted_pairs():
    """RPO's term by hand: pairs 0 and 2 count, −(−6/3 + −1/1)/2 = 1.5; masked values never
    reach the result or its gradient, even when NaN."""
    logps = jnp.array([-6.0, jnp.nan, -1.0])
    tokens = jnp.array([3.0, 5.0, 1.0])
    mask = jnp.array([True, False, True])
    assert float(chosen_nll(logps, tokens, mask=mask)) == pytest.approx(1.5)
    grad = jax.grad(lambda x: chosen_nll(x, tokens, mask=mask))(logps)
    np.testing.assert_allclose(grad, [-1 / 6, 0.0, -0.5])
    assert float(chosen_nll(logps, tokens, mask=jnp.zeros(3, bool))) == 0.0

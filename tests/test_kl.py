"""HyPO's KL surrogate (design §5): its gradient is the gradient of the true KL; and the HyPO
loss."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from losses import dpo_loss, hypo_loss, kl_surrogate

P, S = 6, 4


def _np_kl_surrogate(policy, reference, mask):
    """Value, KL estimate and d surrogate / d policy_logps, by loops in float64."""
    policy, reference = np.asarray(policy, np.float64), np.asarray(reference, np.float64)
    logratio = policy - reference
    n = max(mask.sum(), 1)
    value, kl, grad = 0.0, 0.0, np.zeros_like(policy)
    for p in np.flatnonzero(mask):
        for i in range(S):
            baseline = np.mean([logratio[p, j] for j in range(S) if j != i])
            advantage = logratio[p, i] - baseline
            value += advantage * policy[p, i] / (S * n)
            grad[p, i] = advantage / (S * n)
            kl += logratio[p, i] / (S * n)
    return value, kl, grad


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    policy = rng.normal(-40.0, 10.0, size=(P, S)).astype(np.float32)
    reference = (policy + rng.normal(0.0, 2.0, size=(P, S))).astype(np.float32)
    return policy, reference


_surrogate_value_and_grads = jax.jit(jax.value_and_grad(kl_surrogate, argnums=(0, 1), has_aux=True))


def test_matches_numpy_reference_with_mask():
    policy, reference = _inputs()
    mask = np.array([True, False, True, True, False, True])
    (value, metrics), (g_policy, g_reference) = _surrogate_value_and_grads(policy, reference,
                                                                           mask_P=mask)
    ref_value, ref_kl, ref_grad = _np_kl_surrogate(policy, reference, mask)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], ref_kl, rtol=1e-5)
    assert metrics["num_prompts"] == mask.sum()
    np.testing.assert_allclose(g_policy, ref_grad, rtol=1e-5, atol=1e-7)
    assert np.all(g_reference == 0)  # the log-ratio factor is a constant


@settings(max_examples=30, deadline=None)
@given(shift_P=hnp.arrays(np.float32, (P,), elements=st.floats(-50, 50, width=32)))
def test_rloo_baseline_removes_a_per_prompt_offset(shift_P):
    # One offset on all log-ratios of a prompt is absorbed by the baseline: value and gradient.
    policy, reference = _inputs(1)
    (value, _), (grad, _) = _surrogate_value_and_grads(policy, reference)
    shifted_reference = reference + shift_P[:, None]
    (shifted, _), (shifted_grad, _) = _surrogate_value_and_grads(policy, shifted_reference)
    np.testing.assert_allclose(shifted, value, atol=1e-3 * (1 + abs(float(value))))
    np.testing.assert_allclose(shifted_grad, grad, atol=1e-5)


def test_single_sample_has_no_baseline():
    policy, reference = _inputs()
    value, metrics = kl_surrogate(policy[:, :1], reference[:, :1])
    logratio = policy[:, 0] - reference[:, 0]
    np.testing.assert_allclose(value, np.mean(logratio * policy[:, 0]), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], np.mean(logratio), rtol=1e-5)


# ---- Monte Carlo: the surrogate's gradient is ∇ KL(π_θ ‖ π_ref) on a categorical policy ----------

THETA = np.array([0.5, -0.3, 1.2, 0.0, -1.0], np.float32)
PHI = np.array([0.0, 0.4, -0.5, 0.8, 0.2], np.float32)  # the reference's logits
NUM_PROMPTS, SAMPLES_PER_PROMPT = 5000, 4  # 20k samples


def _exact_kl(theta):
    logp, logq = jax.nn.log_softmax(theta), jax.nn.log_softmax(PHI)
    return jnp.sum(jnp.exp(logp) * (logp - logq))


def _samples_PS():
    probs = np.exp(np.asarray(jax.nn.log_softmax(THETA), np.float64))
    rng = np.random.default_rng(0)
    return rng.choice(len(THETA), size=(NUM_PROMPTS, SAMPLES_PER_PROMPT), p=probs / probs.sum())


def _surrogate_of_theta(theta, y_PS):
    return kl_surrogate(jax.nn.log_softmax(theta)[y_PS], jax.nn.log_softmax(PHI)[y_PS])[0]


def _plain_estimate_of_theta(theta, y_PS):
    return kl_surrogate(jax.nn.log_softmax(theta)[y_PS], jax.nn.log_softmax(PHI)[y_PS])[1]["kl"]


@jax.jit
def _per_prompt_grads(y_PS):
    """Per-prompt gradients [P, 5] of the surrogate, of the surrogate with S = 1, and of mean ℓ.

    Prompts are independent, so the spread of these rows gives each estimator's standard error.
    """
    surrogate = jax.vmap(lambda y_K: jax.grad(_surrogate_of_theta)(THETA, y_K[None]))(y_PS)
    # [S, 1]: S one-sample "prompts", averaged: the same 4 samples without a baseline.
    no_baseline = jax.vmap(lambda y_K: jax.grad(_surrogate_of_theta)(THETA, y_K[:, None]))(y_PS)
    plain = jax.vmap(lambda y_K: jax.grad(_plain_estimate_of_theta)(THETA, y_K[None]))(y_PS)
    return surrogate, no_baseline, plain


def _mean_and_standard_error(grads_N5):
    return grads_N5.mean(0), grads_N5.std(0, ddof=1) / np.sqrt(len(grads_N5))


def test_surrogate_gradient_matches_analytic_kl_gradient():
    y_PS = _samples_PS()
    logp, logq = jax.nn.log_softmax(THETA), jax.nn.log_softmax(PHI)
    probs, kl = np.exp(logp), float(_exact_kl(THETA))
    analytic = probs * (logp - logq - kl)  # d/dθ_j Σ p log(p/q) = p_j (ℓ_j − KL) for p = softmax(θ)
    np.testing.assert_allclose(jax.grad(_exact_kl)(THETA), analytic, atol=1e-6)

    surrogate, no_baseline, plain = map(np.asarray, _per_prompt_grads(y_PS))
    # The full-batch surrogate is the mean over prompts: its gradient is the mean of the rows.
    np.testing.assert_allclose(jax.grad(_surrogate_of_theta)(THETA, y_PS), surrogate.mean(0),
                               atol=1e-4)  # float32 sums over 5000 prompts

    # Unbiased: within 4 standard errors of the exact gradient, per component (|z| > 4: p ≈ 6e-5).
    for grads in (surrogate, no_baseline):
        mean, standard_error = _mean_and_standard_error(grads)
        assert np.all(np.abs(mean - analytic) <= 4 * standard_error + 1e-6), (mean, analytic)

    # Differentiating ℓ directly: expected gradient zero, far from the KL gradient.
    mean, standard_error = _mean_and_standard_error(plain)
    assert np.all(np.abs(mean) <= 4 * standard_error)
    assert np.max(np.abs(mean - analytic) / standard_error) > 20


# ---- HyPO ---------------------------------------------------------------------------------------


def _pairs(seed=2, b=5):
    return np.random.default_rng(seed).normal(-30.0, 5.0, size=(4, b)).astype(np.float32)


def _hypo(pairs, policy, reference, lam, mask=None, sample_mask=None):
    return hypo_loss(*pairs, sample_policy_logps_PS=policy, sample_reference_logps_PS=reference,
                     beta=0.2, lam=lam, mask=mask, sample_mask_P=sample_mask)


_hypo_value_and_grads = jax.jit(jax.value_and_grad(_hypo, argnums=(0, 1, 2), has_aux=True))


def test_hypo_is_dpo_plus_lambda_times_the_surrogate():
    pairs, (policy, reference) = _pairs(), _inputs()
    (loss, metrics), (g_pairs, g_policy, _) = _hypo_value_and_grads(pairs, policy, reference, 0.3)
    dpo, dpo_metrics = dpo_loss(*pairs, beta=0.2)
    surrogate, kl_metrics = kl_surrogate(policy, reference)
    np.testing.assert_allclose(loss, dpo + 0.3 * surrogate, rtol=1e-6)
    assert set(metrics) == set(dpo_metrics) | set(kl_metrics) | {"dpo_loss", "kl_surrogate"}
    np.testing.assert_allclose(metrics["kl"], kl_metrics["kl"], rtol=1e-6)
    np.testing.assert_allclose(metrics["dpo_loss"], dpo, rtol=1e-6)
    np.testing.assert_allclose(g_policy, 0.3 * _surrogate_value_and_grads(policy, reference)[1][0],
                               rtol=1e-5)
    dpo_grads = jax.grad(lambda x: dpo_loss(*x, beta=0.2)[0])(pairs)
    np.testing.assert_allclose(g_pairs, dpo_grads, rtol=1e-6)  # the KL term touches samples only


@pytest.mark.parametrize("all_masked", [False, True])
def test_extreme_inputs_give_finite_losses_and_gradients(all_masked):
    rng = np.random.default_rng(3)
    pairs = (rng.choice([-1.0, 1.0], size=(4, 5)) * 1e4).astype(np.float32)
    policy = (rng.choice([-1.0, 1.0], size=(P, S)) * 1e4).astype(np.float32)
    reference = -policy
    mask = np.zeros(5, bool) if all_masked else None
    sample_mask = np.zeros(P, bool) if all_masked else None
    (loss, metrics), grads = _hypo_value_and_grads(pairs, policy, reference, 0.5, mask, sample_mask)
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)
    assert all(np.isfinite(v) for v in metrics.values())
    if all_masked:
        assert loss == 0.0 and all(np.all(g == 0) for g in grads)


def test_masked_prompts_contribute_nothing():
    policy, reference = _inputs()
    mask = np.arange(P) % 2 == 0
    dirty_policy = np.where(mask[:, None], policy, np.nan)
    (value, metrics), (grad, _) = _surrogate_value_and_grads(dirty_policy, reference, mask_P=mask)
    (kept, kept_metrics), (kept_grad, _) = _surrogate_value_and_grads(policy[mask], reference[mask])
    np.testing.assert_allclose(value, kept, rtol=1e-6)
    np.testing.assert_allclose(metrics["kl"], kept_metrics["kl"], rtol=1e-6)
    assert np.all(grad[~mask] == 0)
    np.testing.assert_allclose(grad[mask], kept_grad, rtol=1e-6)


def test_jit_and_vmap_over_leading_axis():
    stacked = [np.stack([x, x[::-1]]) for x in _inputs()]
    values, metrics = jax.jit(jax.vmap(kl_surrogate))(*stacked)
    chex.assert_shape(values, (2,))
    for g in range(2):
        value, single = kl_surrogate(stacked[0][g], stacked[1][g])
        # The value cancels (advantages sum to 0 per prompt): compare at the scale of its terms.
        np.testing.assert_allclose(values[g], value, atol=1e-4)
        np.testing.assert_allclose(metrics["kl"][g], single["kl"], rtol=1e-5)


def test_shapes_are_validated():
    policy, reference = _inputs()
    with pytest.raises(AssertionError):
        kl_surrogate(policy[:, 0], reference[:, 0])
    with pytest.raises(AssertionError):
        kl_surrogate(policy, reference[:, :-1])
    with pytest.raises(AssertionError):
        kl_surrogate(policy, reference, mask_P=np.ones(P + 1, bool))

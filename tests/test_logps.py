"""Sequence log-probabilities (design §1) against a NumPy log-softmax reference."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from losses import sequence_logps, shift_labels, token_logps

B, T, V = 3, 6, 11


def _np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _np_sequence_logps(logits, labels, mask, average=False):
    logp = _np_log_softmax(logits)
    out = np.zeros(logits.shape[0])
    for b in range(logits.shape[0]):
        picked = [logp[b, t, labels[b, t]] for t in range(logits.shape[1]) if mask[b, t]]
        out[b] = sum(picked) / max(len(picked), 1) if average else sum(picked)
    return out


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    labels = rng.integers(0, V, size=(B, T))
    mask = rng.random((B, T)) < 0.6
    mask[-1] = False  # one zero-length response
    labels = np.where(mask, labels, -100)  # garbage outside the mask
    return logits, labels, mask


def test_token_logps_match_numpy_log_softmax():
    logits, labels, _ = _inputs()
    labels = np.abs(labels) % V
    expected = np.take_along_axis(_np_log_softmax(logits), labels[..., None], -1)[..., 0]
    got = token_logps(logits, labels)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_match_numpy(average):
    logits, labels, mask = _inputs()
    got = jax.jit(sequence_logps, static_argnames="average")(logits, labels, mask, average=average)
    np.testing.assert_allclose(got, _np_sequence_logps(logits, labels, mask, average), rtol=1e-5,
                               atol=1e-5)
    assert got[-1] == 0.0  # zero-length response


def test_bfloat16_logits_give_float32_logps():
    logits, labels, mask = _inputs()
    logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
    got = sequence_logps(logits_bf16, labels, mask)
    assert got.dtype == jnp.float32
    # Same as float32 math on the bf16-rounded logits: no bf16 reduction anywhere.
    expected = _np_sequence_logps(np.asarray(logits_bf16.astype(jnp.float32)), labels, mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("average", [False, True])
def test_zero_length_response_has_zero_logp_and_finite_grads(average):
    logits, labels, _ = _inputs()
    mask = np.zeros((B, T), bool)
    total = lambda x: sequence_logps(x, labels, mask, average=average).sum()
    value, grad = jax.value_and_grad(total)(jnp.asarray(logits))
    assert value == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_gradient_is_onehot_minus_softmax_on_response_tokens():
    logits, labels, mask = _inputs()
    grad = jax.grad(lambda x: sequence_logps(x, labels, mask).sum())(jnp.asarray(logits))
    probs = np.exp(_np_log_softmax(logits))
    onehot = np.eye(V)[np.where(mask, labels, 0)]
    expected = (onehot - probs) * mask[..., None]
    np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_extreme_logits_stay_finite():
    logits, labels, mask = _inputs()
    logits = np.where(np.arange(V) % 2 == 0, 1e4, -1e4).astype(np.float32) * np.ones((B, T, 1))
    value, grad = jax.value_and_grad(lambda x: sequence_logps(x, labels, mask).sum())(
        jnp.asarray(logits))
    assert np.isfinite(value) and np.all(np.isfinite(grad))


@settings(max_examples=30, deadline=None)
@given(shift=hnp.arrays(np.float32, (B, T, 1), elements=st.floats(-100, 100, width=32)))
def test_token_logps_invariant_to_per_position_logit_shift(shift):
    logits, labels, _ = _inputs()
    labels = np.abs(labels) % V
    # A small-magnitude shift keeps float32 rounding of logits + shift below the tolerance.
    np.testing.assert_allclose(token_logps(logits + shift, labels), token_logps(logits, labels),
                               atol=1e-4)


def test_shift_labels_aligns_next_token_targets():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, V, size=(2, T))
    # Row 0: prompt of 2 tokens, response of 3 (EOS last), 1 pad; row 1: prompt 3, response 3.
    response_mask = np.array([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], bool)
    logits = rng.normal(size=(2, T, V)).astype(np.float32)
    labels, mask = shift_labels(tokens, response_mask)
    assert not np.any(mask[:, -1])
    got = sequence_logps(logits, labels, mask)
    logp = _np_log_softmax(logits)
    expected = [sum(logp[b, t - 1, tokens[b, t]] for t in range(T) if response_mask[b, t])
                for b in range(2)]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_jit_and_vmap_over_leading_axis():
    logits, labels, mask = _inputs()
    stacked = [np.stack([x, x[::-1]]) for x in (logits, labels, mask)]
    got = jax.jit(jax.vmap(sequence_logps))(*stacked)
    chex.assert_shape(got, (2, B))
    np.testing.assert_allclose(got[0], sequence_logps(logits, labels, mask), rtol=1e-6)
    np.testing.assert_allclose(got[1], sequence_logps(logits[::-1], labels[::-1], mask[::-1]),
                               rtol=1e-6)


def test_shape_mismatch_is_rejected():
    logits, labels, mask = _inputs()
    with pytest.raises(AssertionError):
        sequence_logps(logits, labels[:, :-1], mask[:, :-1])

"""The sampling distribution: temperature, top-k and nucleus (top-p) truncation of logits.

Both truncations find their cut-off by bisection over the float32 bit patterns of the
logits instead of sorting the vocabulary: 32 masked reductions per row, exact (the cut-off
is one of the logits), and on a CPU about ten times faster than sorting 49k tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -jnp.inf


def _ordered_bits(x: jax.Array) -> jax.Array:
    """uint32 keys that sort like the float32 values."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(i >> 31 == 1, ~i, i | jnp.uint32(0x80000000))


def _cutoff(keys_RV: jax.Array, weights_RV: jax.Array, limit: float) -> jax.Array:
    """Per row, the smallest key c whose strictly-greater tokens weigh less than `limit`.

    The weight above c only grows as c falls, so bisection over the 32 key bits finds c
    exactly; c is always some token's key, and keeping `keys >= c` keeps that token.
    """

    def light(c_R):
        return jnp.sum(jnp.where(keys_RV > c_R[:, None], weights_RV, 0), axis=-1) < limit

    def body(_, bounds):  # invariant: light(hi); the answer lies in [lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = light(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    lo = jnp.zeros(keys_RV.shape[:1], jnp.uint32)
    lo, hi = jax.lax.fori_loop(0, 32, body, (lo, jnp.max(keys_RV, axis=-1)))
    return jnp.where(light(lo), lo, hi)


def sampling_logprobs(logits_RV: jax.Array, *, temperature: float, top_k: int, top_p: float):
    """Log-probabilities [R, V] of the distribution tokens are drawn from (float32).

    Top-k keeps the k most likely tokens; top-p then keeps each token whose strictly more
    likely tokens hold less than p of the mass (Holtzman et al. 2020): the smallest head of
    the sorted distribution that reaches p, at least one token. Tokens tied at a cut-off are
    all kept. Both follow temperature, as transformers' logits warpers do. Excluded tokens
    get -inf.
    """
    logits = logits_RV.astype(jnp.float32) / temperature
    keys = _ordered_bits(logits)
    if top_k and top_k < logits.shape[-1]:
        cut = _cutoff(keys, jnp.ones_like(logits), top_k)
        logits = jnp.where(keys >= cut[:, None], logits, NEG)
    if top_p < 1.0:
        cut = _cutoff(keys, jax.nn.softmax(logits, axis=-1), top_p)
        logits = jnp.where(keys >= cut[:, None], logits, NEG)
    return jax.nn.log_softmax(logits, axis=-1)

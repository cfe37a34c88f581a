"""The sampling distribution: temperature, top-k and nucleus (top-p) truncation of logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -jnp.inf


def sampling_logprobs(logits_RV: jax.Array, *, temperature: float, top_k: int, top_p: float):
    """Log-probabilities [R, V] of the distribution tokens are drawn from (float32).

    Top-k keeps the k most likely tokens; top-p then keeps the smallest head of the sorted
    distribution whose mass reaches p (Holtzman et al. 2020), always at least one token.
    Both are applied after temperature, as transformers' logits warpers are. Excluded
    tokens get -inf.
    """
    logits = logits_RV.astype(jnp.float32) / temperature
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, NEG, logits)
    if top_p < 1.0:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep = mass_before < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, NEG, logits)
    return jax.nn.log_softmax(logits, axis=-1)

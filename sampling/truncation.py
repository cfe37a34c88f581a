"""The sampling distribution: temperature, top-k and nucleus (top-p) truncation of logits.

`sampling_logprobs` finds each cut-off by bisection over the float32 bit patterns of the
logits instead of sorting the vocabulary: 32 masked reductions per row, exact (the cut-off
is one of the logits), and on a CPU about ten times faster than sorting 49k tokens.
`draw` samples from the same distribution, first among the `candidates` most likely tokens,
which hold the whole truncated support in almost every row, and falls back to the bisection
for the rows where they do not.
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


CANDIDATES = 256  # most likely tokens `draw` looks at before the full-vocabulary fallback


def _inverse_cdf(u_R: jax.Array, logp_RX: jax.Array, block: int = 256) -> jax.Array:
    """Index of the first entry whose cumulative probability exceeds u (excluded: -inf).

    Over more than `block` entries, in two levels (I blocks of E entries): the block where the
    running total of block masses first exceeds u, then the entry inside it (a cumulative sum
    over the whole vocabulary is slow on a CPU).
    """
    r, n = logp_RX.shape
    if n <= block:
        cdf_RX = jnp.cumsum(jnp.exp(logp_RX), axis=-1)
        return jnp.argmax(cdf_RX > (u_R * cdf_RX[:, -1])[:, None], axis=-1)
    p_RIE = jnp.exp(jnp.pad(logp_RX, ((0, 0), (0, -n % block)), constant_values=NEG))
    p_RIE = p_RIE.reshape(r, -1, block)
    cdf_RI = jnp.cumsum(jnp.sum(p_RIE, axis=-1), axis=-1)
    target_R = u_R * cdf_RI[:, -1]
    block_R = jnp.minimum(jnp.sum(cdf_RI <= target_R[:, None], axis=-1), cdf_RI.shape[1] - 1)
    before_R = jnp.take_along_axis(cdf_RI, block_R[:, None] - 1, -1)[:, 0]
    before_R = jnp.where(block_R > 0, before_R, 0.0)
    p_RE = jnp.take_along_axis(p_RIE, block_R[:, None, None], axis=1)[:, 0]
    above = before_R[:, None] + jnp.cumsum(p_RE, axis=-1) > target_R[:, None]
    # rounding can leave the block's total a hair under the target: its last token then
    last = block - 1 - jnp.argmax((p_RE > 0)[:, ::-1], axis=-1)
    return block_R * block + jnp.where(jnp.any(above, axis=-1), jnp.argmax(above, axis=-1), last)


def _draw_full(u_R, logits_RV, *, temperature, top_k, top_p):
    logp_RV = sampling_logprobs(logits_RV, temperature=temperature, top_k=top_k, top_p=top_p)
    token = _inverse_cdf(u_R, logp_RV)
    return token.astype(jnp.int32), jnp.take_along_axis(logp_RV, token[:, None], axis=-1)[:, 0]


def draw(
    u_R: jax.Array,
    logits_RV: jax.Array,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    candidates: int = CANDIDATES,
):
    """One token per row from the `sampling_logprobs` distribution, by inverse CDF at u in [0, 1).

    Returns (token [R] int32, its log-probability [R] float32). Rows whose truncated support
    lies inside their `candidates` most likely tokens (`lax.top_k`: a partial sort) draw
    among those; the others fall back to bisection over the whole vocabulary, computed for
    those rows only. A row's token depends on its own logits and u alone.
    """
    v = logits_RV.shape[-1]
    m = min(v, max(candidates, top_k + 1))
    if m == v or (top_p >= 1.0 and not top_k):  # no truncation to narrow the vocabulary down
        return _draw_full(u_R, logits_RV, temperature=temperature, top_k=top_k, top_p=top_p)
    z_RV = logits_RV.astype(jnp.float32) / temperature
    # descending; the barrier keeps XLA from folding later slices into the top-k, which on
    # a CPU turns its partial sort (a TopK call) into a full sort of the vocabulary
    top_RX, idx_RX = jax.lax.optimization_barrier(jax.lax.top_k(z_RV, m))
    cut_R = top_RX[:, top_k - 1] if top_k else top_RX[:, -1]  # top-k keeps ties with the k-th
    if top_p < 1.0:
        # probabilities after top-k (its survivors are all candidates, or the row falls back)
        if top_k:
            kept = top_RX >= cut_R[:, None]
            lse_R = jax.nn.logsumexp(jnp.where(kept, top_RX, NEG), axis=-1)
            p_RX = jnp.where(kept, jnp.exp(top_RX - lse_R[:, None]), 0.0)
        else:
            p_RX = jnp.exp(top_RX - jax.nn.logsumexp(z_RV, axis=-1)[:, None])
        above_RX = jnp.cumsum(p_RX, axis=-1) - p_RX  # mass of the more likely candidates
        # Holtzman et al. 2020: the least likely token whose more likely tokens hold < p
        last = jnp.sum(above_RX < top_p, axis=-1) - 1
        cut_R = jnp.maximum(cut_R, jnp.take_along_axis(top_RX, last[:, None], axis=-1)[:, 0])
    # exact when the least likely candidate is cut: every token outside is less likely still
    fast_R = top_RX[:, -1] < cut_R
    logp_RX = jax.nn.log_softmax(jnp.where(top_RX >= cut_R[:, None], top_RX, NEG), axis=-1)
    pick = _inverse_cdf(u_R, logp_RX)
    token = jnp.take_along_axis(idx_RX, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
    logp = jnp.take_along_axis(logp_RX, pick[:, None], axis=-1)[:, 0]

    # the rest draw from the whole vocabulary, a few rows at a time (one row's result does
    # not depend on the rows it shares a chunk with)
    rows = max(1, len(u_R) // 8)
    order = jnp.argsort(fast_R, stable=True)  # rows to redo first
    chunks = (jnp.sum(~fast_R) + rows - 1) // rows

    def redo(state):
        i, token, logp = state
        idx = jax.lax.dynamic_slice_in_dim(order, i * rows, rows)  # clamped at the end
        full_t, full_lp = _draw_full(
            u_R[idx], logits_RV[idx], temperature=temperature, top_k=top_k, top_p=top_p
        )
        use = ~fast_R[idx]
        token = token.at[idx].set(jnp.where(use, full_t, token[idx]))
        logp = logp.at[idx].set(jnp.where(use, full_lp, logp[idx]))
        return i + 1, token, logp

    _, token, logp = jax.lax.while_loop(lambda s: s[0] < chunks, redo, (0, token, logp))
    return token, logp

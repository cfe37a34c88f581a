"""The sampling distribution: temperature, top-k and nucleus (top-p) truncation of logits.

`sampling_logprobs` finds each cut-off by bisection over the float32 bit patterns of the
logits instead of sorting the vocabulary: 32 masked reductions per row, exact (the cut-off
is one of the logits), and on a CPU about ten times faster than sorting 49k tokens.
`draw` samples from the same distribution by one of three paths, chosen per backend
(`draw_path`): on a CPU first among the `candidates` most likely tokens, which hold the whole
truncated support in almost every row, falling back to the bisection for the rows where they
do not; on a GPU or TPU by one sort per row, with no data-dependent loop.
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


def _draw_from(u_R, logp_RX, idx_RX=None):
    """Inverse-CDF draw from log-probabilities [R, X] in vocabulary order; `idx_RX` maps
    column to token where the X columns are a subset of the vocabulary."""
    pick = _inverse_cdf(u_R, logp_RX)
    token = pick if idx_RX is None else jnp.take_along_axis(idx_RX, pick[:, None], -1)[:, 0]
    return token.astype(jnp.int32), jnp.take_along_axis(logp_RX, pick[:, None], axis=-1)[:, 0]


def _draw_bisect(u_R, logits_RV, *, temperature, top_k, top_p):
    logp_RV = sampling_logprobs(logits_RV, temperature=temperature, top_k=top_k, top_p=top_p)
    return _draw_from(u_R, logp_RV)


def _sorted_cut(desc_RX: jax.Array, top_k: int, top_p: float, lse_R=None) -> jax.Array:
    """Per row, the smallest logit top-k then top-p keep, from logits in descending order.

    `desc_RX` holds a row's whole vocabulary, or its head with `lse_R` the log-partition of
    the whole row (top-k off; with top-k on, its survivors must all be in the head).
    """
    cut_R = desc_RX[:, top_k - 1] if top_k else desc_RX[:, -1]  # top-k keeps ties with the k-th
    if top_p < 1.0:
        kept = desc_RX >= cut_R[:, None]
        if lse_R is None or top_k:
            lse_R = jax.nn.logsumexp(jnp.where(kept, desc_RX, NEG), axis=-1)
        p_RX = jnp.where(kept, jnp.exp(desc_RX - lse_R[:, None]), 0.0)
        above_RX = jnp.cumsum(p_RX, axis=-1) - p_RX  # mass of the more likely tokens
        # Holtzman et al. 2020: the least likely token whose more likely tokens hold < p; the
        # first of tied tokens sees only the strictly more likely ones, so ties stay together
        last = jnp.sum(above_RX < top_p, axis=-1) - 1
        cut_R = jnp.maximum(cut_R, jnp.take_along_axis(desc_RX, last[:, None], axis=-1)[:, 0])
    return cut_R


def _draw_sort(u_R, logits_RV, *, temperature, top_k, top_p):
    # one sort of the values (no indices) and a cumulative sum: no loop at all
    z_RV = logits_RV.astype(jnp.float32) / temperature
    desc_RV = jnp.flip(jnp.sort(z_RV, axis=-1), axis=-1)
    cut_R = _sorted_cut(desc_RV, top_k if top_k < z_RV.shape[-1] else 0, top_p)
    return _draw_from(u_R, jax.nn.log_softmax(jnp.where(z_RV >= cut_R[:, None], z_RV, NEG), -1))


def _draw_candidates(u_R, logits_RV, *, temperature, top_k, top_p, candidates):
    v = logits_RV.shape[-1]
    m = min(v, max(candidates, top_k + 1))
    if m == v:  # nothing to narrow the vocabulary down to
        return _draw_bisect(u_R, logits_RV, temperature=temperature, top_k=top_k, top_p=top_p)
    z_RV = logits_RV.astype(jnp.float32) / temperature
    # descending; the barrier keeps XLA from folding later slices into the top-k, which on
    # a CPU turns its partial sort (a TopK call) into a full sort of the vocabulary
    # (one barrier per output: XLA's TopK decomposer, which runs when the program spans
    # several devices, expects each user of the top-k to take one of its outputs)
    top_RX, idx_RX = map(jax.lax.optimization_barrier, jax.lax.top_k(z_RV, m))
    # top-k's survivors are all candidates (m > top_k); without top-k, p needs the whole row
    lse_R = None if top_k else jax.nn.logsumexp(z_RV, axis=-1)
    cut_R = _sorted_cut(top_RX, top_k, top_p, lse_R)
    # exact when the least likely candidate is cut: every token outside is less likely still
    fast_R = top_RX[:, -1] < cut_R
    # the draw runs in vocabulary order, as on the other paths: the same u, the same token
    idx_RX, top_RX = jax.lax.sort((idx_RX, top_RX), dimension=1, num_keys=1)
    logp_RX = jax.nn.log_softmax(jnp.where(top_RX >= cut_R[:, None], top_RX, NEG), axis=-1)
    token, logp = _draw_from(u_R, logp_RX, idx_RX)

    # the rest draw from the whole vocabulary, a few rows at a time (one row's result does
    # not depend on the rows it shares a chunk with)
    rows = max(1, len(u_R) // 8)
    order = jnp.argsort(fast_R, stable=True)  # rows to redo first
    chunks = (jnp.sum(~fast_R) + rows - 1) // rows

    def redo(state):
        i, token, logp = state
        idx = jax.lax.dynamic_slice_in_dim(order, i * rows, rows)  # clamped at the end
        full_t, full_lp = _draw_bisect(
            u_R[idx], logits_RV[idx], temperature=temperature, top_k=top_k, top_p=top_p
        )
        use = ~fast_R[idx]
        token = token.at[idx].set(jnp.where(use, full_t, token[idx]))
        logp = logp.at[idx].set(jnp.where(use, full_lp, logp[idx]))
        return i + 1, token, logp

    _, token, logp = jax.lax.while_loop(lambda s: s[0] < chunks, redo, (0, token, logp))
    return token, logp


DRAW_PATHS = ("auto", "candidates", "sort", "bisect")


def draw_path(path: str = "auto") -> str:
    """The path `draw` takes: `path` itself, or for "auto" the one that suits the default
    backend at trace time: "candidates" on a CPU, "sort" on a GPU or TPU.

    A GPU's TopK kernel handles k <= 16 only (XLA:GPU turns top_k(256) into a full sort),
    and the candidates' fallback loop has a data-dependent trip count, whose predicate
    XLA:GPU copies to the host on every iteration; one sort is cheaper there.
    """
    if path not in DRAW_PATHS:
        raise ValueError(f"draw path {path!r} is not one of {DRAW_PATHS}")
    if path != "auto":
        return path
    return "candidates" if jax.default_backend() == "cpu" else "sort"


def draw(
    u_R: jax.Array,
    logits_RV: jax.Array,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    candidates: int = CANDIDATES,
    path: str = "auto",
):
    """One token per row from the `sampling_logprobs` distribution, by inverse CDF at u in [0, 1).

    Returns (token [R] int32, its log-probability [R] float32). The cumulative distribution
    runs in vocabulary order on every path, so each path draws the same token for the same u
    (up to float32 rounding at a boundary). The paths (`draw_path`) find the cut-offs by:
    - "candidates": `lax.top_k` of `candidates` tokens (a partial sort on a CPU); rows whose
      truncated support lies outside them fall back to "bisect", a few rows at a time, in a
      loop whose trip count depends on the data;
    - "sort": one sort of each row's logits and a cumulative sum, no loop;
    - "bisect": `sampling_logprobs`, two fixed 32-step bisections over the whole row.
    A row's token depends on its own logits and u alone.
    """
    path = draw_path(path)
    args = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    if path == "bisect" or (top_p >= 1.0 and not top_k):  # untruncated: log_softmax alone
        return _draw_bisect(u_R, logits_RV, **args)
    if path == "sort":
        return _draw_sort(u_R, logits_RV, **args)
    return _draw_candidates(u_R, logits_RV, candidates=candidates, **args)

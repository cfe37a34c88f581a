"""Sequence log-probabilities, the unit every loss consumes (design §1).

Convention: `logits_BTV[:, t]` is the distribution for `labels_BT[:, t]`; the caller has aligned
them (`shift_labels` does it for logits computed on the full token sequence). Math is float32.
"""

import chex
import jax
import jax.numpy as jnp


def shift_labels(tokens_BT: jax.Array, response_mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Aligns next-token targets with the logits of the sequence that produced them.

    Logits computed on `tokens_BT` predict the NEXT token: position t scores token t + 1. Shifting
    the labels (not slicing the logits) keeps the [B, T, V] logits uncopied.

    Args:
      tokens_BT: int tokens, prompt ⊕ response ⊕ padding.
      response_mask_BT: True on response tokens (EOS included), False on prompt and padding.

    Returns:
      `(labels_BT, mask_BT)` with `labels_BT[:, t] = tokens_BT[:, t + 1]` and the matching mask;
      the last position predicts nothing (label 0, masked). Token 0 can never be scored, so a
      response must not start at position 0 (it never does: the prompt comes first).
    """
    chex.assert_rank(tokens_BT, 2)
    chex.assert_equal_shape([tokens_BT, response_mask_BT])
    labels_BT = jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, 1)))
    mask_BT = jnp.pad(response_mask_BT[:, 1:].astype(bool), ((0, 0), (0, 1)))
    return labels_BT, mask_BT


def token_logps(logits_BTV: jax.Array, labels_BT: jax.Array) -> jax.Array:
    """Per-token log-probabilities log softmax(logits)[label], in float32.

    Args:
      logits_BTV: logits of any float dtype; `logits_BTV[:, t]` is the distribution for
        `labels_BT[:, t]`.
      labels_BT: int labels in [0, V).

    Returns:
      float32 `logps_BT`.
    """
    chex.assert_rank(logits_BTV, 3)
    chex.assert_rank(labels_BT, 2)
    chex.assert_equal_shape_prefix([logits_BTV, labels_BT], 2)
    # float32: a bf16 log-softmax over the vocabulary loses the signal (design §1).
    logits_BTV = logits_BTV.astype(jnp.float32)
    # logit[label] − logsumexp: two reductions, no [B, T, V] log-softmax array.
    label_logits_BT = jnp.take_along_axis(logits_BTV, labels_BT[..., None], axis=-1)[..., 0]
    return label_logits_BT - jax.nn.logsumexp(logits_BTV, axis=-1)


def sequence_logps(
    logits_BTV: jax.Array,
    labels_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    average: bool = False,
) -> jax.Array:
    """Sequence log-probabilities log π(y | x) over response tokens (design §1).

    Args:
      logits_BTV: aligned logits (see `token_logps`), any float dtype.
      labels_BT: int labels; values at masked positions are ignored (padding ids such as -100
        are fine).
      mask_BT: True on response tokens (EOS included), False on prompt and padding.
      average: divide by the number of response tokens (the per-token convention IPO is often
        run with).

    Returns:
      float32 `logps_B`. A response of zero tokens gives 0, with finite gradients, either way.
    """
    chex.assert_equal_shape([labels_BT, mask_BT])
    mask_BT = mask_BT.astype(bool)
    labels_BT = jnp.where(mask_BT, labels_BT, 0)  # any index is in range; its logp is dropped below
    logps_BT = jnp.where(mask_BT, token_logps(logits_BTV, labels_BT), 0.0)
    logps_B = jnp.sum(logps_BT, axis=-1)
    if average:
        # max(n, 1): an empty response keeps logp 0 instead of 0/0.
        num_tokens_B = jnp.maximum(jnp.sum(mask_BT, axis=-1), 1).astype(jnp.float32)
        logps_B = logps_B / num_tokens_B
    return logps_B


def packed_sequence_logps(
    logits_JV: jax.Array,
    labels_J: jax.Array,
    seq_J: jax.Array,
    num_seqs: int,
    *,
    average: bool = False,
) -> jax.Array:
    """`sequence_logps` of packed targets (design §1): J logits and labels in any order, each
    belonging to sequence `seq_J` in [0, num_seqs) or to none (-1, filler).

    Returns float32 `logps_N` [num_seqs]; a sequence without targets gives 0.
    """
    chex.assert_rank([logits_JV, labels_J, seq_J], [2, 1, 1])
    chex.assert_equal_shape([labels_J, seq_J])
    valid_J = seq_J >= 0
    labels_J = jnp.where(valid_J, labels_J, 0)
    logps_J = jnp.where(valid_J, token_logps(logits_JV[:, None], labels_J[:, None])[:, 0], 0.0)
    seq_J = jnp.where(valid_J, seq_J, num_seqs)  # filler into one extra segment, dropped
    logps_N = jax.ops.segment_sum(logps_J, seq_J, num_segments=num_seqs + 1)[:num_seqs]
    if average:  # max(n, 1) as in `sequence_logps`
        counts_N = jax.ops.segment_sum(valid_J.astype(jnp.float32), seq_J, num_seqs + 1)
        logps_N = logps_N / jnp.maximum(counts_N[:num_seqs], 1.0)
    return logps_N

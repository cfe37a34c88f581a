"""Host-side layout of responses for the train step (NumPy only).

Every response becomes a row: its prompt left-padded to `prompt_len` columns, then the
response right-padded to the response width. Pairs are two rows per prompt (chosen, then
rejected), in a `PairBatch`; HyPO's online samples are S rows per prompt (`OnlineSamples`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from optune_jax.batch import PairBatch
from optune_jax.selection import Pairs


def ended_with_eos(
    tokens_QY: np.ndarray, lengths_Q: np.ndarray, eos_ids: Sequence[int]
) -> np.ndarray:
    """True where a response's last token is an EOS id (it was not cut at the budget)."""
    last = tokens_QY[np.arange(len(lengths_Q)), np.maximum(lengths_Q - 1, 0)]
    return (lengths_Q > 0) & np.isin(last, np.asarray(eos_ids))


def layout(
    prompts: Sequence[Sequence[int]],
    tokens_NSY: np.ndarray,
    lengths_NS: np.ndarray,
    *,
    prompt_len: int,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, attn, resp), each int32 [N, S, T], for S responses to each of N prompts."""
    n, s, width = tokens_NSY.shape
    shape = (n, s, prompt_len + width)
    tokens = np.full(shape, pad_id, np.int32)
    attn = np.zeros(shape, np.int32)
    resp = np.zeros(shape, np.int32)
    tokens[:, :, prompt_len:] = tokens_NSY
    on = (np.arange(width) < lengths_NS[..., None]).astype(np.int32)
    attn[:, :, prompt_len:] = on
    resp[:, :, prompt_len:] = on
    for row, prompt in enumerate(prompts):
        tokens[row, :, prompt_len - len(prompt) : prompt_len] = prompt
        attn[row, :, prompt_len - len(prompt) : prompt_len] = 1
    return tokens, attn, resp


def pair_batch(
    prompts: Sequence[Sequence[int]],
    pairs: Pairs,
    *,
    prompt_len: int,
    pad_id: int,
    eos_ids: Sequence[int],
    drop_truncated: bool,
) -> tuple[PairBatch, np.ndarray]:
    """The Q pairs of D_t as a host `PairBatch` [Q] (reference logps still 0) and their
    prompt indices [Q].

    `drop_truncated` masks pairs with a response cut at the token budget (design §1: never
    append an EOS the model did not produce; keep or drop is the config's choice).
    """
    tokens = np.stack([pairs.chosen_tokens_QY, pairs.rejected_tokens_QY], axis=1)
    lengths = np.stack([pairs.chosen_lengths_Q, pairs.rejected_lengths_Q], axis=1)
    rows = layout(
        [prompts[p] for p in pairs.prompt_idx_Q],
        tokens,
        lengths,
        prompt_len=prompt_len,
        pad_id=pad_id,
    )
    keep = np.ones((len(pairs.prompt_idx_Q),), bool)
    if drop_truncated:
        keep &= ended_with_eos(pairs.chosen_tokens_QY, pairs.chosen_lengths_Q, eos_ids)
        keep &= ended_with_eos(pairs.rejected_tokens_QY, pairs.rejected_lengths_Q, eos_ids)
    rewards = np.stack([pairs.chosen_rewards_Q, pairs.rejected_rewards_Q], axis=1)
    batch = PairBatch(
        *rows,
        ref_logps=np.zeros(rewards.shape, np.float32),
        rewards=rewards.astype(np.float32),
        pair_mask=keep,
    )
    return batch, pairs.prompt_idx_Q.astype(np.int32)

"""Host-side layout of responses for the train step (NumPy only).

Every response becomes a row: its prompt left-padded to `prompt_len` columns, then the
response right-padded to the response width. Pairs are two rows per prompt (chosen, then
rejected); HyPO's online samples are k rows per prompt (see `train_step` for array names).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from optune_jax.selection import Pairs


def ended_with_eos(
    tokens_KL: np.ndarray, lengths_K: np.ndarray, eos_ids: Sequence[int]
) -> np.ndarray:
    """True where a response's last token is an EOS id (it was not cut at the budget)."""
    last = tokens_KL[np.arange(len(lengths_K)), np.maximum(lengths_K - 1, 0)]
    return (lengths_K > 0) & np.isin(last, np.asarray(eos_ids))


def layout(
    prompts: Sequence[Sequence[int]],
    tokens_NSL: np.ndarray,
    lengths_NS: np.ndarray,
    *,
    prompt_len: int,
    pad_id: int,
    prefix: str = "",
) -> dict[str, np.ndarray]:
    """tokens/attn/resp arrays [N, S, T] for S responses to each of N prompts."""
    n, s, width = tokens_NSL.shape
    shape = (n, s, prompt_len + width)
    tokens = np.full(shape, pad_id, np.int32)
    attn = np.zeros(shape, np.int32)
    resp = np.zeros(shape, np.int32)
    tokens[:, :, prompt_len:] = tokens_NSL
    on = (np.arange(width) < lengths_NS[..., None]).astype(np.int32)
    attn[:, :, prompt_len:] = on
    resp[:, :, prompt_len:] = on
    for row, prompt in enumerate(prompts):
        tokens[row, :, prompt_len - len(prompt) : prompt_len] = prompt
        attn[row, :, prompt_len - len(prompt) : prompt_len] = 1
    suffix = "K2T" if s == 2 and not prefix else "NST"
    return {
        f"{prefix}tokens_{suffix}": tokens,
        f"{prefix}attn_{suffix}": attn,
        f"{prefix}resp_{suffix}": resp,
    }


def pair_arrays(
    prompts: Sequence[Sequence[int]],
    pairs: Pairs,
    *,
    prompt_len: int,
    pad_id: int,
    eos_ids: Sequence[int],
    drop_truncated: bool,
) -> dict[str, np.ndarray]:
    """Arrays [K, 2, T] for the K pairs of D_t (chosen, rejected), with rewards and mask.

    `drop_truncated` masks pairs with a response cut at the token budget (SPEC §1: never
    append an EOS the model did not produce; keep or drop is the config's choice).
    """
    tokens = np.stack([pairs.chosen_tokens_KL, pairs.rejected_tokens_KL], axis=1)
    lengths = np.stack([pairs.chosen_lengths_K, pairs.rejected_lengths_K], axis=1)
    out = layout(
        [prompts[p] for p in pairs.prompt_idx_K],
        tokens,
        lengths,
        prompt_len=prompt_len,
        pad_id=pad_id,
    )
    keep = np.ones((len(pairs.prompt_idx_K),), bool)
    if drop_truncated:
        keep &= ended_with_eos(pairs.chosen_tokens_KL, pairs.chosen_lengths_K, eos_ids)
        keep &= ended_with_eos(pairs.rejected_tokens_KL, pairs.rejected_lengths_K, eos_ids)
    rewards = np.stack([pairs.chosen_rewards_K, pairs.rejected_rewards_K], axis=1)
    return dict(
        out,
        rewards_K2=rewards.astype(np.float32),
        pair_mask_K=keep,
        prompt_idx_K=pairs.prompt_idx_K.astype(np.int32),
    )


def batches(
    arrays: dict[str, np.ndarray], order_K: np.ndarray, *, batch_size: int, micro_batch_size: int
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(pair indices, optimizer batch [A, M, ...]) in `order_K`; the last batch is filled
    with masked copies of its first pair."""
    accum = batch_size // micro_batch_size
    for start in range(0, len(order_K), batch_size):
        idx = order_K[start : start + batch_size]
        fill = batch_size - len(idx)
        idx_full = np.concatenate([idx, np.repeat(idx[:1], fill)])
        out = {}
        for name, x in arrays.items():
            if name == "prompt_idx_K":
                continue
            part = x[idx_full]
            if name == "pair_mask_K" and fill:
                part[-fill:] = False
            out[name.replace("_K", "_AM", 1)] = part.reshape(accum, micro_batch_size, *x.shape[1:])
        yield idx_full, out

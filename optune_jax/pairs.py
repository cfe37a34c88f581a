"""Host-side layout of preference pairs for the train step (NumPy only).

Each pair becomes two rows, chosen then rejected: prompt left-padded to `prompt_len` columns,
then the response right-padded to the pool's width (see `train_step` for the array names).
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


def pair_arrays(
    prompts: Sequence[Sequence[int]],
    pairs: Pairs,
    *,
    prompt_len: int,
    pad_id: int,
    eos_ids: Sequence[int],
    drop_truncated: bool,
) -> dict[str, np.ndarray]:
    """Arrays [K, 2, T] for the K pairs of D_t, T = prompt_len + response width.

    `drop_truncated` masks pairs with a response cut at the token budget (SPEC §1: never
    append an EOS the model did not produce; keep or drop is the config's choice).
    """
    k = len(pairs.prompt_idx_K)
    width = pairs.chosen_tokens_KL.shape[1]
    tokens = np.full((k, 2, prompt_len + width), pad_id, np.int32)
    attn = np.zeros((k, 2, prompt_len + width), np.int32)
    resp = np.zeros((k, 2, prompt_len + width), np.int32)
    cols = np.arange(width)
    for side, (toks, lens) in enumerate(
        (
            (pairs.chosen_tokens_KL, pairs.chosen_lengths_K),
            (pairs.rejected_tokens_KL, pairs.rejected_lengths_K),
        )
    ):
        tokens[:, side, prompt_len:] = toks
        on = (cols[None] < lens[:, None]).astype(np.int32)
        attn[:, side, prompt_len:] = on
        resp[:, side, prompt_len:] = on
    for row, p in enumerate(pairs.prompt_idx_K):
        prompt = prompts[p]
        tokens[row, :, prompt_len - len(prompt) : prompt_len] = prompt
        attn[row, :, prompt_len - len(prompt) : prompt_len] = 1
    keep = np.ones((k,), bool)
    if drop_truncated:
        keep &= ended_with_eos(pairs.chosen_tokens_KL, pairs.chosen_lengths_K, eos_ids)
        keep &= ended_with_eos(pairs.rejected_tokens_KL, pairs.rejected_lengths_K, eos_ids)
    rewards = np.stack([pairs.chosen_rewards_K, pairs.rejected_rewards_K], axis=1)
    return dict(
        tokens_K2T=tokens,
        attn_K2T=attn,
        resp_K2T=resp,
        rewards_K2=rewards.astype(np.float32),
        pair_mask_K=keep,
    )


def batches(
    arrays: dict[str, np.ndarray], order_K: np.ndarray, *, batch_size: int, micro_batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Optimizer batches [A, M, ...] in `order_K`; the last one is filled with masked pairs."""
    accum = batch_size // micro_batch_size
    for start in range(0, len(order_K), batch_size):
        idx = order_K[start : start + batch_size]
        fill = batch_size - len(idx)
        out = {}
        for name, x in arrays.items():
            part = x[idx]
            if fill:
                part = np.concatenate([part, np.repeat(part[:1], fill, axis=0)])
                if name == "pair_mask_K":
                    part[-fill:] = False
            out[name.replace("_K", "_AM", 1)] = part.reshape(accum, micro_batch_size, *x.shape[1:])
        yield out

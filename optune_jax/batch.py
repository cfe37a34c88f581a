"""Typed batches of the train steps: preference pairs and HyPO's online samples.

Every field carries its shape after the leading batch axes `*B` (letters: design §11): [Q] for
all pairs of D_t on the host, [A, M] for one optimizer step (A micro-batches
of M pairs), [M] inside the step. Slice with `jax.tree.map`; a batch crosses `jit` as a pytree.
Rows are the prompt left-padded to `data.max_prompt_tokens` columns, then the response
right-padded (`optune_jax.pair_rows`): T = max_prompt_tokens + Y. A batch for the device may carry
`PackedRows` instead (`optune_jax.packing`, `train.pack`): its rows' real tokens end to end in
G lines of W slots, each prompt once with its responses after it; the row fields are then None.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import struct

Array = Any  # NumPy on the host, jax.Array on the devices


@struct.dataclass
class PackedRows:
    """Responses to prompts, packed (`optune_jax.packing.pack_rows`): segment = a prompt (branch
    0) followed by its responses (branches 1, 2, ...), which see the prompt and themselves."""

    tokens: Array  # [*B, G, W] int32
    pos: Array  # [*B, G, W] int32, RoPE positions: a response continues from its prompt
    segment: Array  # [*B, G, W] int32, the segment of each slot; -1 on padding
    branch: Array  # [*B, G, W] int32, 0 on the prompt, b + 1 on its b-th response
    logit_at: Array  # [*B, J] int32, flat slot (into G * W) whose logits predict `target`
    target: Array  # [*B, J] int32
    seq: Array  # [*B, J] int32, the response of each target (prompt n, response b: n * S + b);
    #             -1 on filler


@struct.dataclass
class OnlineSamples:
    """S samples per prompt of π_θ for HyPO's KL term (design §5)."""

    tokens: Array | None  # [*B, S, T] int32 (None when packed with the pairs)
    attn: Array | None  # [*B, S, T] int32, 1 on prompt and response tokens
    resp: Array | None  # [*B, S, T] int32, 1 on response tokens (EOS included)
    ref_logps: Array  # [*B, S] float32, sequence logps under the reference (design §3)
    mask: Array  # [*B] bool, False where the step draws no samples (the KL term is masked)


@struct.dataclass
class PairBatch:
    """Preference pairs, chosen at index 0 and rejected at 1 of the pair axis."""

    tokens: Array | None  # [*B, 2, T] int32 (None when `packed`)
    attn: Array | None  # [*B, 2, T] int32
    resp: Array | None  # [*B, 2, T] int32
    ref_logps: Array  # [*B, 2] float32 (design §3)
    rewards: Array  # [*B, 2] float32, explicit rewards (wDPO's weight, design §2)
    pair_mask: Array  # [*B] bool, False for ties, dropped and filler pairs
    samples: OnlineSamples | None = None  # HyPO only
    packed: PackedRows | None = None  # the pairs' (and samples') rows, packed [*B, G, W]

    @classmethod
    def abstract(
        cls, lead: tuple[int, ...], length: int, *, samples: int = 0, sharding=None, packed=None
    ):
        """ShapeDtypeStructs of a batch with leading axes `lead` and rows of `length` tokens
        (`samples` > 0: with HyPO's samples per prompt), for lowering without data. `packed`
        = (G, W, J): the rows packed into G lines of W slots with J targets instead, in place
        of the last leading axis."""

        def s(shape, dtype, lead=lead):
            return jax.ShapeDtypeStruct((*lead, *shape), dtype, sharding=sharding)

        rows = lambda n: [s((n, length), np.int32) for _ in range(3)]
        lines = None
        if packed is not None:
            g, w, j = packed  # lines replace the last batch axis (the pairs)
            lines = PackedRows(
                *(s((g, w), np.int32, lead[:-1]) for _ in range(4)),
                *(s((j,), np.int32, lead[:-1]) for _ in range(3)),
            )
            rows = lambda n: [None] * 3
        online = None
        if samples:
            online = OnlineSamples(
                *rows(samples), s((samples,), np.float32), s((), np.bool_)
            )
        return cls(
            *rows(2), s((2,), np.float32), s((2,), np.float32), s((), np.bool_), online, lines
        )


@struct.dataclass
class ScoredPairBatch:
    """Preference pairs for the reward model's Bradley–Terry step (chosen 0, rejected 1)."""

    tokens: Array  # [*B, 2, T] int32, right-padded conversations
    mask: Array  # [*B, 2, T] int32, 1 on real tokens
    pair_mask: Array  # [*B] bool, False for filler pairs


def micro_batches(batch, order_Q: np.ndarray, *, batch_size: int, micro_batch_size: int):
    """(pair indices, batch [A, M]) in `order_Q` from a host batch [Q]; the last is filled up
    with masked copies of its first pair."""
    accum = batch_size // micro_batch_size
    for start in range(0, len(order_Q), batch_size):
        idx = order_Q[start : start + batch_size]
        fill = batch_size - len(idx)
        idx = np.concatenate([idx, np.repeat(idx[:1], fill)])
        part = jax.tree.map(
            lambda x, i=idx: x[i].reshape(accum, micro_batch_size, *x.shape[1:]), batch
        )
        mask = part.pair_mask.reshape(-1).copy()
        mask[len(mask) - fill :] = False
        yield idx, part.replace(pair_mask=mask.reshape(accum, micro_batch_size))

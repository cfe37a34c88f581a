"""The key/value cache of generation: its layout, its size, and the writes that fill it."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from models.backend import set_in_place, write_in_place
from models.config import ModelConfig


@struct.dataclass
class LayerKV:
    """One layer's buffers of a `KVCache` and the slot a decode step writes its token to."""

    k_BKHC: jax.Array
    v_BKCH: jax.Array
    slot: jax.Array  # int32 scalar

    def write(self, key_BTKH: jax.Array, val_BTKH: jax.Array) -> LayerKV:
        """The buffers with the step's key and value (T = 1) written at `slot`, in place."""
        k = write_in_place(self.k_BKHC, key_BTKH.transpose(0, 2, 3, 1), (0, 0, 0, self.slot))
        v = write_in_place(self.v_BKCH, val_BTKH.transpose(0, 2, 1, 3), (0, 0, self.slot, 0))
        return self.replace(k_BKHC=k, v_BKCH=v)


@struct.dataclass
class KVCache:
    """Preallocated key/value cache, an explicit pytree passed in and returned.

    One key array [B, K, H, C] and one value array [B, K, C, H] per layer: a decode step reads
    and writes each layer's own buffers in place (slicing a stacked [L, ...] cache copies it on
    a CPU), and both attention products are plain batched matmuls without a transpose.
    Slots form a ring buffer addressed by sequence index (slot = index mod C), so a
    sliding-window model needs only C = window slots. `pos_BC` holds each slot's token
    position (-1 for empty slots and padding); attention masks are built from it.
    """

    k_BKHC: tuple[jax.Array, ...]  # one per layer
    v_BKCH: tuple[jax.Array, ...]
    pos_BC: jax.Array
    index: jax.Array  # int32 scalar: sequence index of the next token written
    next_pos_B: jax.Array  # int32: position the next token of each row takes

    @property
    def num_slots(self) -> int:
        return self.v_BKCH[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))

    @property
    def slot(self) -> jax.Array:
        """The ring buffer slot the next token is written to."""
        return self.index % self.num_slots

    def next_positions(self) -> tuple[jax.Array, jax.Array]:
        """The rows' next positions [B, 1], and `pos_BC` with them in the slot they take."""
        pos_B1 = self.next_pos_B[:, None]
        # the new token takes the ring buffer's next slot (a sliding window's oldest token)
        return pos_B1, jax.lax.dynamic_update_slice(self.pos_BC, pos_B1, (0, self.slot))

    def layers(self) -> tuple[LayerKV, ...]:
        """Each layer's buffers with the slot of the next token."""
        return tuple(
            LayerKV(k, v, self.slot) for k, v in zip(self.k_BKHC, self.v_BKCH, strict=True)
        )

    def advance(self, layers: Sequence[LayerKV], pos_BC: jax.Array) -> KVCache:
        """The cache after a decode step: its written `layers` and slot positions `pos_BC`."""
        return KVCache(
            k_BKHC=tuple(x.k_BKHC for x in layers),
            v_BKCH=tuple(x.v_BKCH for x in layers),
            pos_BC=pos_BC,
            index=self.index + 1,
            next_pos_B=self.next_pos_B + 1,
        )

    def fill(self, k_LBUKH, v_LBUKH, slots_U, pos_BU, *, index: int, next_pos_B) -> KVCache:
        """The cache with keys, values [L, B, S, K, H] and positions [B, S] at slots [S]."""
        k_BKHC = tuple(  # [B, S, K, H] -> the slots of [B, K, H, C] and [B, K, C, H]
            set_in_place(buf, k_LBUKH[i].transpose(0, 2, 3, 1), (..., slots_U))
            for i, buf in enumerate(self.k_BKHC)
        )
        v_BKCH = tuple(
            set_in_place(buf, v_LBUKH[i].transpose(0, 2, 1, 3), (slice(None), slice(None), slots_U))
            for i, buf in enumerate(self.v_BKCH)
        )
        return KVCache(
            k_BKHC=k_BKHC,
            v_BKCH=v_BKCH,
            pos_BC=self.pos_BC.at[:, slots_U].set(pos_BU),
            index=jnp.asarray(index, jnp.int32),
            next_pos_B=next_pos_B,
        )


def cache_slots(config: ModelConfig, max_len: int) -> int:
    """Slots a cache for `max_len` tokens needs: never more than the sliding window."""
    if config.sliding_window is not None:
        return min(max_len, config.sliding_window)
    return max_len


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype="float32") -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (prompt plus new tokens)."""
    c = cache_slots(config, max_len)
    k, h, dt = config.num_key_value_heads, config.head_dim, jnp.dtype(dtype)
    layers = range(config.num_hidden_layers)
    return KVCache(
        k_BKHC=tuple(jnp.zeros((batch, k, h, c), dt) for _ in layers),
        v_BKCH=tuple(jnp.zeros((batch, k, c, h), dt) for _ in layers),
        pos_BC=jnp.full((batch, c), -1, jnp.int32),
        index=jnp.zeros((), jnp.int32),
        next_pos_B=jnp.zeros((batch,), jnp.int32),
    )

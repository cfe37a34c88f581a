"""Generation through `Transformer`: a prefill fills a key/value cache, decode steps extend it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.kv_cache import KVCache, init_cache
from models.layers import allowed_keys
from models.mistral import Transformer, positions_from_mask


def prefill(
    params,
    tokens_BT,
    mask_BT,
    *,
    config: ModelConfig,
    max_len: int,
    dtype="float32",
    prefix_F=None,
    pack_GW=None,
):
    """Runs left-padded prompts in one pass and fills a fresh cache sized for `max_len` tokens.

    `prefix_F` (int32 [F]), when given, is a prefix shared by every row: its keys and values are
    computed once and each row continues it with its own tokens (prefix sharing, as in vLLM's
    prefix caching), so a row's sequence is prefix + the real tokens of its row.
    `pack_GW` (int32 [G, W]), when given, computes the rows' real tokens packed into G lines of
    W slots instead of B rows of T: slot (g, w) holds the token at flat index `pack_GW[g, w]`
    of `tokens_BT` (-1: empty), each row's tokens contiguous and in order inside one line
    (`sampling.pack_rows`). Attention stays inside a row and its prefix, so only the padding
    computed changes.
    Returns (float32 logits of each row's next token [B, V], cache).
    """
    b, t = tokens_BT.shape
    p = 0 if prefix_F is None else prefix_F.shape[0]
    if p + t > max_len:
        raise ValueError(f"prompt length {p + t} exceeds the cache length max_len={max_len}")
    cache = init_cache(config, b, max_len, dtype)
    c, window = cache.num_slots, config.sliding_window
    if p and max_len > c:  # the ring buffer would overwrite the prefix before the padding
        raise ValueError(
            f"a shared prefix needs a slot per token; max_len={max_len} exceeds the {c} "
            "slots of the sliding window: pass the prompts whole"
        )
    run = functools.partial(Transformer(config, dtype=jnp.dtype(dtype)).apply, {"params": params})
    prefix_kv = None
    if p:  # the prefix once, as a one-row prompt; its cache slots come first in every row
        pos_1F = jnp.arange(p)[None]
        allowed = allowed_keys(pos_1F, pos_1F, window)
        _, prefix_kv = run(prefix_F[None], pos_1F, allowed, keep_kv=p, return_hidden=True)
        prefix_kv = jax.tree.map(lambda x: x[:, 0], prefix_kv)  # [L, F, K, H]
    mask = mask_BT.astype(bool)
    pos = p + positions_from_mask(mask_BT)
    slot_pos = jnp.concatenate(  # every key's position, -1 for padding
        [jnp.broadcast_to(jnp.arange(p), (b, p)), jnp.where(mask, pos, -1)], axis=1
    )
    tail = min(t, c)  # a sliding window keeps the last c tokens
    slots = jnp.arange(p + t - tail, p + t) % c
    if pack_GW is None:
        allowed = allowed_keys(pos, slot_pos, window)
        # left-padded prompts: the last column is every row's newest token
        logits, (k_LBTKH, v_LBTKH) = run(
            tokens_BT, pos, allowed, prefix_kv=prefix_kv, keep_kv=tail, logits_from=-1
        )
        logits = logits[:, 0]
    else:
        if max_len > c:
            raise ValueError(
                f"packed prompts need a slot per token; max_len={max_len} exceeds the {c} "
                "slots of the sliding window: pass them unpacked"
            )
        logits, k_LBTKH, v_LBTKH = _prefill_packed(
            run, tokens_BT, slot_pos, pack_GW, prefix_kv, window=window
        )
    if p:  # the prefix's slots [0, P), then the rows' own tokens
        k_LBTKH, v_LBTKH = (
            jnp.concatenate([jnp.broadcast_to(x[:, None], (x.shape[0], b, *x.shape[1:])), y], 2)
            for x, y in zip(prefix_kv, (k_LBTKH, v_LBTKH), strict=True)
        )
        slots, tail = jnp.arange(p + t), p + t
    next_pos_B = p + jnp.sum(mask, axis=-1).astype(jnp.int32)
    pos_BS = slot_pos[:, p + t - tail :]
    return logits, cache.fill(k_LBTKH, v_LBTKH, slots, pos_BS, index=p + t, next_pos_B=next_pos_B)


def _prefill_packed(run, tokens_BT, slot_pos_BS, pack_GW, prefix_kv, *, window):
    """The prefill of `prefill(pack_GW=...)`: logits [B, V] and keys, values [L, B, T, K, H]."""
    b, t = tokens_BT.shape
    g, w = pack_GW.shape
    p = slot_pos_BS.shape[1] - t
    filled = pack_GW >= 0
    at = jnp.maximum(pack_GW, 0)
    pos_GW = jnp.where(filled, slot_pos_BS[:, p:].reshape(-1)[at], -1)  # -1: empty or padding
    row_GW = jnp.where(pos_GW >= 0, at // t, -1)
    # a query sees the prefix and the earlier tokens of its own row
    key_pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(p), (g, p)), pos_GW], axis=1)
    same_row = jnp.concatenate(
        [jnp.ones((g, w, p), bool), row_GW[:, :, None] == row_GW[:, None, :]], axis=2
    )
    allowed = allowed_keys(pos_GW, key_pos, window) & same_row
    # each row's slots: where its tokens sit in the lines (padding reads slot 0; masked)
    flat = jnp.where(filled, pack_GW, b * t).reshape(-1)
    src_BT = jnp.zeros((b * t,), jnp.int32).at[flat].set(jnp.arange(g * w), mode="drop")
    src_BT = src_BT.reshape(b, t)
    logits, kv = run(
        tokens_BT.reshape(-1)[at],
        jnp.maximum(pos_GW, 0),
        allowed,
        prefix_kv=prefix_kv,
        keep_kv=w,
        logits_at_R=src_BT[:, -1],  # left padding: column T-1 is real
    )
    k_LBTKH, v_LBTKH = (x.reshape(x.shape[0], g * w, *x.shape[3:])[:, src_BT] for x in kv)
    return logits, k_LBTKH, v_LBTKH


def _layer(layers, i: int):
    return jax.tree.map(lambda x: x[i], layers)


def unstack_layers(params):
    """The parameters with the stacked `layers` [L, ...] split into one tree per layer.

    Layer i becomes `layers_{i}`, the weights a decode step's `Transformer` reads. It runs
    layer by layer; handing it unstacked weights once, before a decode loop, saves it from
    slicing (on a CPU: copying) every layer's weights at every step.
    """
    if "layers" not in params:
        return params
    layers = params["layers"]
    depth = jax.tree.leaves(layers)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {**rest, **{f"layers_{i}": _layer(layers, i) for i in range(depth)}}


def decode_step(params, tokens_B, cache: KVCache, *, config: ModelConfig, dtype="float32"):
    """Feeds one token per row at the cache's next position; returns (logits [B, V], cache).

    `params` may have stacked or unstacked (`unstack_layers`) layers; a loop should unstack once.
    """
    pos_B1, pos_BC = cache.next_positions()
    allowed = allowed_keys(pos_B1, pos_BC, config.sliding_window)
    model = Transformer(config, dtype=jnp.dtype(dtype))
    logits, layers = model.apply(
        {"params": unstack_layers(params)}, tokens_B[:, None], pos_B1, allowed, kv=cache
    )
    return logits[:, 0], cache.advance(layers, pos_BC)

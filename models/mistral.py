"""The Mistral / Llama decoder in Flax Linen: a full-sequence forward and a cached decode step.

Shapes are named by suffix: B batch, T query length, S key length, C cache slots, D hidden,
N query heads, K key/value heads, G = N / K query heads per kv head, H head_dim, F mlp, V vocab,
L layers. Layers are stacked on a leading L axis by `nn.scan` (one compiled layer, any depth).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from models.config import ModelConfig

Dtype = Any
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: fully-masked rows stay NaN-free

REMAT_POLICIES = {
    "none": None,  # keep every activation (no rematerialisation)
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
MODES = ("full", "prefill", "decode")


def _dtype(name: str | Dtype) -> Dtype:
    return jnp.dtype(name)


# ------------------------------------------------------------------------------- rotary
def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] (RoFormer; transformers' rope_type default, linear, llama3)."""
    dim = config.head_dim
    # float32 like transformers: the same frequencies to the last bit keep parity at depth
    inv = 1.0 / (
        np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    )
    scaling = dict(config.rope_scaling or ())
    if config.rope_type == "linear":
        inv = inv / scaling["factor"]
    elif config.rope_type == "llama3":  # Llama 3.1 frequency-dependent interpolation
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x_BTnH: jax.Array, pos_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates halves of each head (transformers' rotate_half convention, not interleaved)."""
    angles = pos_BT.astype(jnp.float32)[..., None] * inv_freq  # B,T,H/2
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x_BTnH.dtype), jnp.sin(angles).astype(x_BTnH.dtype)
    x1, x2 = jnp.split(x_BTnH, 2, axis=-1)
    return x_BTnH * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


# ------------------------------------------------------------------------------- cache
@struct.dataclass
class KVCache:
    """Preallocated key/value cache, an explicit pytree passed in and returned.

    Slots form a ring buffer addressed by sequence index (slot = index mod C), so a
    sliding-window model needs only C = window slots. `pos_BC` holds each slot's token
    position (-1 for empty slots and padding); attention masks are built from it.
    """

    k_LBCKH: jax.Array
    v_LBCKH: jax.Array
    pos_BC: jax.Array
    index: jax.Array  # int32 scalar: sequence index of the next token written
    next_pos_B: jax.Array  # int32: position the next token of each row takes

    @property
    def num_slots(self) -> int:
        return self.k_LBCKH.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))


def cache_slots(config: ModelConfig, max_len: int) -> int:
    """Slots a cache for `max_len` tokens needs: never more than the sliding window."""
    if config.sliding_window is not None:
        return min(max_len, config.sliding_window)
    return max_len


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Dtype = "float32") -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (prompt plus new tokens)."""
    c = cache_slots(config, max_len)
    shape = (config.num_hidden_layers, batch, c, config.num_key_value_heads, config.head_dim)
    return KVCache(
        k_LBCKH=jnp.zeros(shape, _dtype(dtype)),
        v_LBCKH=jnp.zeros(shape, _dtype(dtype)),
        pos_BC=jnp.full((batch, c), -1, jnp.int32),
        index=jnp.zeros((), jnp.int32),
        next_pos_B=jnp.zeros((batch,), jnp.int32),
    )


def _allowed(q_pos_BT, k_pos_BS, window: int | None):
    """Which keys each query sees: causal in positions, valid keys, inside the sliding window."""
    q, k = q_pos_BT[:, :, None], k_pos_BS[:, None, :]
    ok = (k >= 0) & (k <= q)
    if window is not None:
        ok &= q - k < window  # transformers: a query sees the `window` latest positions
    return ok


# ------------------------------------------------------------------------------- layers
def _init(axes):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), axes)


class RMSNorm(nn.Module):
    eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],)
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)  # transformers' cast order


class Einsum(nn.Module):
    """A projection `einsum(eq, x, kernel)` whose kernel carries logical axis names."""

    eq: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", _init(self.axes), self.shape, self.param_dtype)
        return jnp.einsum(self.eq, x.astype(self.dtype), w.astype(self.dtype))


class Attention(nn.Module):
    config: ModelConfig
    mode: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x_BTD, pos_BT, allowed_BTS, cache, layer, slots):
        c = self.config
        d, n, k, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = Einsum(
            "btd,dnh->btnh", (d, n, h), ("embed", "heads", "head_dim"), name="q_proj", **dense
        )(x_BTD)
        key = Einsum(
            "btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"), name="k_proj", **dense
        )(x_BTD)
        val = Einsum(
            "btd,dkh->btkh", (d, k, h), ("embed", "kv_heads", "head_dim"), name="v_proj", **dense
        )(x_BTD)
        inv_freq = rope_inv_freq(c)
        q, key = apply_rope(q, pos_BT, inv_freq), apply_rope(key, pos_BT, inv_freq)
        b, t = q.shape[:2]
        q = q.reshape(b, t, k, c.num_groups, h)
        scores = lambda keys: (
            jnp.einsum(  # float32 attention logits [B, K, G, T, S]
                "btkgh,bskh->bkgts", q, keys.astype(self.dtype), preferred_element_type=jnp.float32
            )
            * (h**-0.5)
        )

        if self.mode == "decode":
            # earlier tokens come from this layer's slice of the cache, read in place; the new
            # token joins as one extra key, and only its k/v leave the layer (written once,
            # by `decode_step`, instead of copying the cache every step)
            cache_k, cache_v = (jax.lax.dynamic_index_in_dim(x, layer, 0, False) for x in cache)
            logits = jnp.where(allowed_BTS[:, None, None], scores(cache_k), MASK_VALUE)
            logits = jnp.concatenate([logits, scores(key)], axis=-1)  # t == 1: self is allowed
            probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
            out = jnp.einsum("bkgts,bskh->btkgh", probs[..., :-1], cache_v.astype(self.dtype))
            out += jnp.einsum("bkgts,bskh->btkgh", probs[..., -1:], val.astype(self.dtype))
            new_kv = (key, val)
        else:  # full and prefill: attend within the chunk
            logits = jnp.where(allowed_BTS[:, None, None], scores(key), MASK_VALUE)
            probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # softmax in float32
            out = jnp.einsum("bkgts,bskh->btkgh", probs, val.astype(self.dtype))
            # prefill hands back the k/v of the newest tokens the cache keeps
            new_kv = (
                None if slots is None else (key[:, -slots.shape[0] :], val[:, -slots.shape[0] :])
            )
        out = Einsum(
            "btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"), name="o_proj", **dense
        )(out.reshape(b, t, n, h))
        return out, new_kv


class MLP(nn.Module):
    config: ModelConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x_BTD):
        d, f = self.config.hidden_size, self.config.intermediate_size
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = Einsum("btd,df->btf", (d, f), ("embed", "mlp"), name="gate_proj", **dense)(x_BTD)
        up = Einsum("btd,df->btf", (d, f), ("embed", "mlp"), name="up_proj", **dense)(x_BTD)
        hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return Einsum("btf,fd->btd", (f, d), ("mlp", "embed"), name="down_proj", **dense)(hidden)


class Block(nn.Module):
    """One pre-norm decoder layer: the scan body (carry = hidden states, xs = layer's cache)."""

    config: ModelConfig
    mode: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x_BTD, pos_BT, allowed_BTS, cache, layer, slots):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, new_kv = Attention(c, self.mode, name="attn", **kw)(
            RMSNorm(c.rms_norm_eps, self.dtype, name="attn_norm")(x_BTD),
            pos_BT,
            allowed_BTS,
            cache,
            layer,
            slots,
        )
        x_BTD = x_BTD + h
        x_BTD = x_BTD + MLP(c, name="mlp", **kw)(
            RMSNorm(c.rms_norm_eps, self.dtype, name="mlp_norm")(x_BTD)
        )
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))
        return x_BTD, new_kv


class Embedder(nn.Module):
    vocab_size: int
    hidden_size: int
    dtype: Dtype
    param_dtype: Dtype

    def setup(self):
        self.embedding = self.param(
            "embedding",
            _init(("vocab", "embed")),
            (self.vocab_size, self.hidden_size),
            self.param_dtype,
        )

    def __call__(self, tokens_BT):
        return jnp.take(self.embedding, tokens_BT, axis=0).astype(self.dtype)

    def attend(self, x_BTD):  # tied output head, float32 logits
        return jnp.einsum(
            "btd,vd->btv",
            x_BTD,
            self.embedding.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )


class Transformer(nn.Module):
    """Mistral/Llama decoder. `mode`: "full" (training, scoring), "prefill" or "decode" (cache).

    `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters created by
    `init`; logits are always float32. `remat` names a rematerialisation policy per layer.
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(
        self,
        tokens_BT,
        pos_BT,
        allowed_BTS,
        cache: KVCache | None = None,
        slots=None,
        *,
        mode: str = "full",
        return_hidden: bool = False,
        logits_from: int = 0,
    ):
        c = self.config
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
        embed = Embedder(c.vocab_size, c.hidden_size, self.dtype, self.param_dtype, name="embed")
        x = nn.with_logical_constraint(embed(tokens_BT), ("batch", "length", "embed"))

        block = Block
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; allowed: {', '.join(REMAT_POLICIES)}")
        if self.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        kv = None if cache is None else (cache.k_LBCKH, cache.v_LBCKH)
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
            length=c.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, mode, self.dtype, self.param_dtype, name="layers")
        layer_ids = jnp.arange(c.num_hidden_layers)
        x, new_kv = layers(x, pos_BT, allowed_BTS, kv, layer_ids, slots)  # new_kv: [L, B, *, K, H]
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="final_norm")(x)
        if return_hidden:
            return x, new_kv
        if mode == "prefill":
            x = x[:, -1:]  # left-padded prompts: the last column is every row's newest token
        x = x[:, logits_from:]  # the vocabulary head only where logits are wanted
        if c.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = _LMHead(
                c.hidden_size, c.vocab_size, self.dtype, self.param_dtype, name="lm_head"
            )(x)
        return logits, new_kv


class _LMHead(nn.Module):
    hidden_size: int
    vocab_size: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x_BTD):
        w = self.param(
            "kernel",
            _init(("embed", "vocab")),
            (self.hidden_size, self.vocab_size),
            self.param_dtype,
        )
        return jnp.einsum(
            "btd,dv->btv", x_BTD, w.astype(self.dtype), preferred_element_type=jnp.float32
        )


# ------------------------------------------------------------------------------- pure API
def _model(config: ModelConfig, dtype, remat="none") -> Transformer:
    return Transformer(config, dtype=_dtype(dtype), remat=remat)


def positions_from_mask(mask_BT: jax.Array) -> jax.Array:
    """Token positions counted over real tokens only, so padding never shifts RoPE (SPEC §1)."""
    return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def init_params(config: ModelConfig, rng: jax.Array, *, param_dtype="float32"):
    """Random parameters (normal(0.02) kernels, unit norms) as a plain pytree."""
    model = Transformer(config, param_dtype=_dtype(param_dtype))
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = model.init(rng, tokens, tokens, jnp.ones((1, 1, 1), bool))["params"]
    return nn.unbox(boxed)


def logical_axes(config: ModelConfig):
    """The parameter tree's logical axis names, as a pytree of `PartitionSpec`s."""
    model = Transformer(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), tokens, tokens, jnp.ones((1, 1, 1), bool))["params"]
    )
    return nn.get_partition_spec(abstract)


def forward(
    params,
    tokens_BT,
    mask_BT,
    *,
    config: ModelConfig,
    dtype="float32",
    remat: str = "none",
    return_hidden: bool = False,
    logits_from: int = 0,
) -> jax.Array:
    """Full-sequence forward: float32 logits [B, T - logits_from, V] (or hidden [B, T, D]).

    Padding may sit on either side; positions come from `mask_BT`. `logits_from` skips the
    vocabulary projection for the first positions (a prompt's tokens need no logits).
    """
    pos = positions_from_mask(mask_BT)
    idx = jnp.arange(tokens_BT.shape[1])
    valid_pos = jnp.where(mask_BT.astype(bool), pos, -1)
    # causal by sequence index (padding sits outside the real tokens) and valid, windowed keys
    allowed = _allowed(
        jnp.broadcast_to(idx, tokens_BT.shape),
        jnp.where(valid_pos >= 0, idx, -1),
        config.sliding_window,
    )
    out, _ = _model(config, dtype, remat).apply(
        {"params": params},
        tokens_BT,
        pos,
        allowed,
        return_hidden=return_hidden,
        logits_from=logits_from,
    )
    return out


def prefill(params, tokens_BT, mask_BT, *, config: ModelConfig, max_len: int, dtype="float32"):
    """Runs left-padded prompts in one pass and fills a fresh cache sized for `max_len` tokens.

    Returns (float32 logits of each row's next token [B, V], cache).
    """
    b, t = tokens_BT.shape
    if t > max_len:
        raise ValueError(f"prompt length {t} exceeds the cache length max_len={max_len}")
    cache = init_cache(config, b, max_len, dtype)
    mask = mask_BT.astype(bool)
    pos = positions_from_mask(mask_BT)
    idx = jnp.arange(t)
    allowed = _allowed(
        jnp.broadcast_to(idx, (b, t)), jnp.where(mask, idx, -1), config.sliding_window
    )
    tail = min(t, cache.num_slots)
    slots = jnp.arange(t - tail, t) % cache.num_slots
    logits, (k, v) = _model(config, dtype).apply(
        {"params": params}, tokens_BT, pos, allowed, None, slots, mode="prefill"
    )
    slot_pos = jnp.where(mask, pos, -1)[:, t - tail :]
    cache = KVCache(
        k_LBCKH=cache.k_LBCKH.at[:, :, slots].set(k.astype(cache.k_LBCKH.dtype)),
        v_LBCKH=cache.v_LBCKH.at[:, :, slots].set(v.astype(cache.v_LBCKH.dtype)),
        pos_BC=cache.pos_BC.at[:, slots].set(slot_pos),
        index=jnp.asarray(t, jnp.int32),
        next_pos_B=jnp.sum(mask, axis=-1).astype(jnp.int32),
    )
    return logits[:, 0], cache


def decode_step(params, tokens_B, cache: KVCache, *, config: ModelConfig, dtype="float32"):
    """Feeds one token per row at the cache's next position; returns (logits [B, V], cache)."""
    pos_B1 = cache.next_pos_B[:, None]
    slot = cache.index % cache.num_slots
    # earlier tokens only: the slot about to be overwritten holds nothing the query may see
    old_pos = jax.lax.dynamic_update_slice(cache.pos_BC, jnp.full_like(pos_B1, -1), (0, slot))
    allowed = _allowed(pos_B1, old_pos, config.sliding_window)
    logits, (k, v) = _model(config, dtype).apply(
        {"params": params}, tokens_B[:, None], pos_B1, allowed, cache, None, mode="decode"
    )
    at = (0, 0, slot, 0, 0)  # one slot of every layer, written in place
    cache = KVCache(
        k_LBCKH=jax.lax.dynamic_update_slice(cache.k_LBCKH, k.astype(cache.k_LBCKH.dtype), at),
        v_LBCKH=jax.lax.dynamic_update_slice(cache.v_LBCKH, v.astype(cache.v_LBCKH.dtype), at),
        pos_BC=jax.lax.dynamic_update_slice(cache.pos_BC, pos_B1, (0, slot)),
        index=cache.index + 1,
        next_pos_B=cache.next_pos_B + 1,
    )
    return logits[:, 0], cache

"""The decoder's layers in Flax Linen: RMSNorm, rotary embeddings, attention, MLP, embeddings.

Shapes are named by suffix: B batch, T query length, S key length, C cache slots, D hidden,
N query heads, K key/value heads, G = N / K query heads per kv head, H head_dim, F mlp, V vocab,
P shared-prefix length, L layers.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.attention import attend
from models.backend import project
from models.config import ModelConfig
from models.kv_cache import LayerKV

Dtype = Any


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


def allowed_keys(q_pos_BT, k_pos_BS, window: int | None) -> jax.Array:
    """Which keys each query sees [B, T, S]: causal in positions, valid keys, in the window."""
    q, k = q_pos_BT[:, :, None], k_pos_BS[:, None, :]
    ok = (k >= 0) & (k <= q)
    if window is not None:
        ok &= q - k < window  # transformers: a query sees the `window` latest positions
    return ok


def packed_allowed(segment_BT, branch_BT, pos_BT, window: int | None) -> jax.Array:
    """Which keys each query sees [B, T, T] in B packed lines of T slots: causal by line index
    within its segment (-1: padding), a branch (> 0) seeing its segment's trunk (branch 0) and
    itself only."""
    t = segment_BT.shape[1]
    seg_q, seg_k = segment_BT[:, :, None], segment_BT[:, None, :]
    br_q, br_k = branch_BT[:, :, None], branch_BT[:, None, :]
    ok = (seg_q == seg_k) & (seg_k >= 0) & (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])
    ok &= (br_k == 0) | (br_k == br_q)
    if window is not None:
        ok &= pos_BT[:, :, None] - pos_BT[:, None, :] < window
    return ok


# ------------------------------------------------------------------------------- layers
def kernel_init(axes):
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
        w = self.param("kernel", kernel_init(self.axes), self.shape, self.param_dtype)
        return project(self.eq, x.astype(self.dtype), w.astype(self.dtype)).astype(self.dtype)


class Attention(nn.Module):
    """Grouped-query attention with rotary positions (Mistral/Llama), float32 softmax.

    `attention` requests a kernel (`models.attention.ATTENTION`, "auto": per backend);
    `mask_kind` says what `allowed_BTU` is known to be (`models.attention.MASK_KINDS`; a
    decode step's is "decode" whatever it says).
    """

    config: ModelConfig
    dtype: Dtype
    param_dtype: Dtype
    attention: str = "auto"
    mask_kind: str = "any"

    @nn.compact
    def __call__(self, x_BTD, pos_BT, allowed_BTU, *, kv: LayerKV | None = None, prefix_kv=None):
        """Returns (output [B, T, D], this layer's keys and values).

        With `kv` (a decode step), the new token's key and value are written at `kv.slot`, the
        queries attend over every cache slot `allowed_BTU` [B, T, C] allows (the new one
        included) and the written `kv` is returned. Otherwise they attend within the chunk,
        after `prefix_kv` (keys, values [F, K, H] of a prefix every row sees first) when given,
        and the chunk's own keys and values [B, T, K, H] are returned.
        """
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
        mask_kind, layouts = self.mask_kind, None
        if kv is not None:  # keys [B, K, H, C], values [B, K, C, H]: plain batched matmuls
            new_kv = kv = kv.write(key, val)
            key, val, mask_kind, layouts = kv.k_BKHC, kv.v_BKCH, "decode", ("bkhs", "bksh")
        else:
            new_kv = (key, val)
            if prefix_kv is not None:  # the prefix's keys and values, seen first
                mask_kind = "any"  # S = P + T: no longer under the diagonal
                key, val = (
                    jnp.concatenate([jnp.broadcast_to(y, (b, *y.shape)).astype(x.dtype), x], 1)
                    for y, x in zip(prefix_kv, (key, val), strict=True)
                )
        out = attend(
            q,
            key,
            val,
            allowed_BTU,
            attention=self.attention,
            mask_kind=mask_kind,
            layouts=layouts,
        )
        out = Einsum(
            "btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"), name="o_proj", **dense
        )(out)
        return out, new_kv


class MLP(nn.Module):
    """The SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

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
    """One pre-norm decoder layer: the scan body of `Transformer`, or a layer of a decode step.

    Returns (hidden, keys and values): with `kv`, the written cache (see `Attention`);
    otherwise those of the newest `keep_kv` tokens of the chunk (None for `keep_kv` = 0).
    `attention` and `mask_kind` go to `Attention`.
    """

    config: ModelConfig
    dtype: Dtype
    param_dtype: Dtype
    keep_kv: int = 0
    attention: str = "auto"
    mask_kind: str = "any"

    @nn.compact
    def __call__(self, x_BTD, pos_BT, allowed_BTU, prefix_kv=None, *, kv: LayerKV | None = None):
        # prefix_kv is positional: nn.scan scans positional arguments only (one per layer)
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = Attention(c, attention=self.attention, mask_kind=self.mask_kind, name="attn", **kw)
        h, new_kv = attn(
            RMSNorm(c.rms_norm_eps, self.dtype, name="attn_norm")(x_BTD),
            pos_BT,
            allowed_BTU,
            kv=kv,
            prefix_kv=prefix_kv,
        )
        if kv is None:
            keep = self.keep_kv
            new_kv = tuple(x[:, -keep:] for x in new_kv) if keep else None
        x_BTD = x_BTD + h
        x_BTD = x_BTD + MLP(c, name="mlp", **kw)(
            RMSNorm(c.rms_norm_eps, self.dtype, name="mlp_norm")(x_BTD)
        )
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))
        return x_BTD, new_kv


class Embedder(nn.Module):
    """Token embeddings; `attend` is the tied output head."""

    vocab_size: int
    hidden_size: int
    dtype: Dtype
    param_dtype: Dtype

    def setup(self):
        self.embedding = self.param(
            "embedding",
            kernel_init(("vocab", "embed")),
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


class LMHead(nn.Module):
    """The untied output head: float32 logits [B, T, V]."""

    hidden_size: int
    vocab_size: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x_BTD):
        w = self.param(
            "kernel",
            kernel_init(("embed", "vocab")),
            (self.hidden_size, self.vocab_size),
            self.param_dtype,
        )
        return jnp.einsum(
            "btd,dv->btv", x_BTD, w.astype(self.dtype), preferred_element_type=jnp.float32
        )

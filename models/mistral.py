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
MODES = ("full", "prefill")  # the Transformer's modes; decoding runs layer by layer (`decode_step`)


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


def cache_slots(config: ModelConfig, max_len: int) -> int:
    """Slots a cache for `max_len` tokens needs: never more than the sliding window."""
    if config.sliding_window is not None:
        return min(max_len, config.sliding_window)
    return max_len


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Dtype = "float32") -> KVCache:
    """An empty cache for `batch` rows of up to `max_len` tokens (prompt plus new tokens)."""
    c = cache_slots(config, max_len)
    k, h = config.num_key_value_heads, config.head_dim
    layers = range(config.num_hidden_layers)
    return KVCache(
        k_BKHC=tuple(jnp.zeros((batch, k, h, c), _dtype(dtype)) for _ in layers),
        v_BKCH=tuple(jnp.zeros((batch, k, c, h), _dtype(dtype)) for _ in layers),
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


def _acc(x: jax.Array):
    """Result dtype of a matmul of `x`: float32 for bfloat16 operands on a CPU.

    XLA:CPU multiplies bfloat16 at twice the float32 rate (AVX512-BF16) only into a float32
    result; for a bfloat16 result it converts both operands to float32 first.
    """
    return jnp.float32 if x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu" else None


def _write(buf, update, start):
    """`dynamic_update_slice` of a cache buffer, in place for bfloat16 too.

    XLA:CPU computes a bfloat16 update in float32: it converts the whole buffer and back at
    every step. The same bits moved as uint16 are written in place on every backend.
    """
    update = update.astype(buf.dtype)
    if buf.dtype != jnp.bfloat16:
        return jax.lax.dynamic_update_slice(buf, update, start)
    bits = jax.lax.bitcast_convert_type
    out = jax.lax.dynamic_update_slice(bits(buf, jnp.uint16), bits(update, jnp.uint16), start)
    return bits(out, jnp.bfloat16)


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
        x, w = x.astype(self.dtype), w.astype(self.dtype)
        ins, out = self.eq.split("->")
        x_dims, w_dims = ins.split(",")
        m = len(w_dims) - len(set(w_dims) & set(out))  # contracted axes: x's last, w's first
        if x_dims[-m:] == w_dims[:m] and out == x_dims[:-m] + w_dims[m:]:
            # one matmul over the merged axes: einsum may contract them in another order,
            # which makes XLA transpose (copy) the kernel at every call
            k = math.prod(w.shape[:m])
            y = jnp.matmul(
                x.reshape(*x.shape[:-m], k), w.reshape(k, -1), preferred_element_type=_acc(x)
            )
            return y.reshape(*x.shape[:-m], *w.shape[m:]).astype(self.dtype)
        return jnp.einsum(self.eq, x, w, preferred_element_type=_acc(x)).astype(self.dtype)


class Attention(nn.Module):
    config: ModelConfig
    mode: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x_BTD, pos_BT, allowed_BTS, cache, slots):
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
        if self.mode == "decode":
            # this layer's cache (keys [B, K, H, C], values [B, K, C, H]: both attention
            # products are then plain batched matmuls): write the new token at slot `slots`
            # in place, then attend over every slot the mask allows (the new one included)
            k_buf, v_buf = cache
            key = _write(k_buf, key.transpose(0, 2, 3, 1), (0, 0, 0, slots))
            val = _write(v_buf, val.transpose(0, 2, 1, 3), (0, 0, slots, 0))
            new_kv, k_layout, v_layout = (key, val), "bkhs", "bksh"
        else:  # full and prefill: attend within the chunk
            # prefill hands back the k/v of the newest tokens the cache keeps
            keep = None if slots is None else slots.shape[0]
            new_kv = None if keep is None else (key[:, -keep:], val[:, -keep:])
            k_layout = v_layout = "bskh"
            if cache is not None:  # a shared prefix's keys and values [P, K, H], seen first
                key, val = (
                    jnp.concatenate([jnp.broadcast_to(c, (b, *c.shape)).astype(x.dtype), x], 1)
                    for c, x in zip(cache, (key, val), strict=True)
                )
        # float32 attention logits [B, K, G, T, S]; t (1 in decode) folded into the groups
        q = q.transpose(0, 2, 3, 1, 4).reshape(b, k, -1, h)
        logits = jnp.einsum(
            f"bkqh,{k_layout}->bkqs", q, key.astype(self.dtype), preferred_element_type=jnp.float32
        )
        logits = logits.reshape(b, k, -1, t, logits.shape[-1]) * (h**-0.5)
        logits = jnp.where(allowed_BTS[:, None, None], logits, MASK_VALUE)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # softmax in float32
        probs = probs.reshape(b, k, -1, probs.shape[-1])
        out = jnp.einsum(
            f"bkqs,{v_layout}->bkqh",
            probs,
            val.astype(self.dtype),
            preferred_element_type=_acc(probs),
        ).astype(self.dtype)
        out = out.reshape(b, k, -1, t, h).transpose(0, 3, 1, 2, 4)
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
    """One pre-norm decoder layer: the scan body in `Transformer`, one call per layer in decode."""

    config: ModelConfig
    mode: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x_BTD, pos_BT, allowed_BTS, cache, slots):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, new_kv = Attention(c, self.mode, name="attn", **kw)(
            RMSNorm(c.rms_norm_eps, self.dtype, name="attn_norm")(x_BTD),
            pos_BT,
            allowed_BTS,
            cache,
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
    """Mistral/Llama decoder. `mode`: "full" (training, scoring) or "prefill" (fills a cache).

    In prefill, `context` (keys, values [L, P, K, H]) is a shared prefix every row sees first.

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
        slots=None,
        context=None,
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
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),  # context: one per layer
            length=c.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, mode, self.dtype, self.param_dtype, name="layers")
        # new_kv: [L, B, *, K, H]
        x, new_kv = layers(x, pos_BT, allowed_BTS, context, slots)
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="final_norm")(x)
        if return_hidden:
            return x, new_kv
        if mode == "prefill":
            x = x[:, -1:]  # left-padded prompts: the last column is every row's newest token
        x = x[:, logits_from:]  # the vocabulary head only where logits are wanted
        if c.tie_word_embeddings:
            return embed.attend(x), new_kv
        return _LMHead(c.hidden_size, c.vocab_size, self.dtype, self.param_dtype, name="lm_head")(
            x
        ), new_kv


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


def prefill(
    params,
    tokens_BT,
    mask_BT,
    *,
    config: ModelConfig,
    max_len: int,
    dtype="float32",
    prefix_P=None,
    pack_GW=None,
):
    """Runs left-padded prompts in one pass and fills a fresh cache sized for `max_len` tokens.

    `prefix_P` (int32 [P]), when given, is a prefix shared by every row: its keys and values are
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
    p = 0 if prefix_P is None else prefix_P.shape[0]
    if p + t > max_len:
        raise ValueError(f"prompt length {p + t} exceeds the cache length max_len={max_len}")
    cache = init_cache(config, b, max_len, dtype)
    c, window = cache.num_slots, config.sliding_window
    if p and max_len > c:  # the ring buffer would overwrite the prefix before the padding
        raise ValueError(
            f"a shared prefix needs a slot per token; max_len={max_len} exceeds the {c} "
            "slots of the sliding window: pass the prompts whole"
        )
    model = _model(config, dtype)
    context = None
    if p:  # the prefix once, as a one-row prompt; its cache slots come first in every row
        pos_1P = jnp.arange(p)[None]
        _, context = model.apply(
            {"params": params},
            prefix_P[None],
            pos_1P,
            _allowed(pos_1P, pos_1P, window),
            jnp.arange(p),
            mode="prefill",
        )
        context = jax.tree.map(lambda x: x[:, 0], context)  # [L, P, K, H]
    mask = mask_BT.astype(bool)
    pos = p + positions_from_mask(mask_BT)
    slot_pos = jnp.concatenate(  # every key's position, -1 for padding
        [jnp.broadcast_to(jnp.arange(p), (b, p)), jnp.where(mask, pos, -1)], axis=1
    )
    tail = min(t, c)  # a sliding window keeps the last c tokens
    slots = jnp.arange(p + t - tail, p + t) % c
    if pack_GW is None:
        logits, (k_LBTKH, v_LBTKH) = model.apply(
            {"params": params},
            tokens_BT,
            pos,
            _allowed(pos, slot_pos, window),
            slots,
            context,
            mode="prefill",
        )
        logits = logits[:, 0]
    else:
        if max_len > c:
            raise ValueError(
                f"packed prompts need a slot per token; max_len={max_len} exceeds the {c} "
                "slots of the sliding window: pass them unpacked"
            )
        logits, k_LBTKH, v_LBTKH = _prefill_packed(
            model, params, tokens_BT, slot_pos, pack_GW, context, config=config
        )
    if p:  # the prefix's slots [0, P), then the rows' own tokens
        k_LBTKH, v_LBTKH = (
            jnp.concatenate([jnp.broadcast_to(x[:, None], (x.shape[0], b, *x.shape[1:])), y], 2)
            for x, y in zip(context, (k_LBTKH, v_LBTKH), strict=True)
        )
        slots, tail = jnp.arange(p + t), p + t
    k_BKHC = tuple(  # [B, T, K, H] -> the slots of [B, K, H, C] and [B, K, C, H]
        buf.at[..., slots].set(k_LBTKH[i].transpose(0, 2, 3, 1).astype(buf.dtype))
        for i, buf in enumerate(cache.k_BKHC)
    )
    v_BKCH = tuple(
        buf.at[:, :, slots].set(v_LBTKH[i].transpose(0, 2, 1, 3).astype(buf.dtype))
        for i, buf in enumerate(cache.v_BKCH)
    )
    cache = KVCache(
        k_BKHC=k_BKHC,
        v_BKCH=v_BKCH,
        pos_BC=cache.pos_BC.at[:, slots].set(slot_pos[:, p + t - tail :]),
        index=jnp.asarray(p + t, jnp.int32),
        next_pos_B=p + jnp.sum(mask, axis=-1).astype(jnp.int32),
    )
    return logits, cache


def _prefill_packed(model, params, tokens_BT, slot_pos_BS, pack_GW, context, *, config):
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
    allowed = _allowed(pos_GW, key_pos, config.sliding_window) & same_row
    hidden, kv = model.apply(
        {"params": params},
        tokens_BT.reshape(-1)[at],
        jnp.maximum(pos_GW, 0),
        allowed,
        jnp.arange(w),
        context,
        mode="prefill",
        return_hidden=True,
    )
    # each row's slots: where its tokens sit in the lines (padding reads slot 0; masked)
    flat = jnp.where(filled, pack_GW, b * t).reshape(-1)
    src_BT = jnp.zeros((b * t,), jnp.int32).at[flat].set(jnp.arange(g * w), mode="drop")
    src_BT = src_BT.reshape(b, t)
    last_BD = hidden.reshape(g * w, -1)[src_BT[:, -1]]  # left padding: column T-1 is real
    logits = _head(params, last_BD[:, None], config, model.dtype)[:, 0]
    k_LBTKH, v_LBTKH = (x.reshape(x.shape[0], g * w, *x.shape[3:])[:, src_BT] for x in kv)
    return logits, k_LBTKH, v_LBTKH


def _head(params, x_BTD, config: ModelConfig, dtype) -> jax.Array:
    """The vocabulary projection of final-norm hidden states: float32 logits [B, T, V]."""
    if config.tie_word_embeddings:
        embed = Embedder(config.vocab_size, config.hidden_size, dtype, dtype)
        return embed.apply({"params": params["embed"]}, x_BTD, method=Embedder.attend)
    head = _LMHead(config.hidden_size, config.vocab_size, dtype, dtype)
    return head.apply({"params": params["lm_head"]}, x_BTD)


def unstack_layers(params):
    """The parameters with `layers` as one tree per layer instead of stacked on a leading L axis.

    `decode_step` runs layer by layer; handing it unstacked weights once, before a decode
    loop, saves it from slicing (on a CPU: copying) every layer's weights at every step.
    """
    layers = params["layers"]
    if isinstance(layers, tuple):
        return params
    depth = jax.tree.leaves(layers)[0].shape[0]
    layer = lambda i: jax.tree.map(lambda x: x[i], layers)
    return {**params, "layers": tuple(layer(i) for i in range(depth))}


def decode_step(params, tokens_B, cache: KVCache, *, config: ModelConfig, dtype="float32"):
    """Feeds one token per row at the cache's next position; returns (logits [B, V], cache).

    `params` may have stacked or unstacked (`unstack_layers`) layers; a loop should unstack once.
    """
    dt = _dtype(dtype)
    pos_B1 = cache.next_pos_B[:, None]
    slot = cache.index % cache.num_slots
    # the new token takes the ring buffer's next slot (a sliding window's oldest token)
    pos_BC = jax.lax.dynamic_update_slice(cache.pos_BC, pos_B1, (0, slot))
    allowed = _allowed(pos_B1, pos_BC, config.sliding_window)
    embed = Embedder(config.vocab_size, config.hidden_size, dt, dt)
    x = embed.apply({"params": params["embed"]}, tokens_B[:, None])
    block = Block(config, "decode", dt, dt)
    new_k, new_v = [], []
    layers = unstack_layers(params)["layers"]
    for layer, k, v in zip(layers, cache.k_BKHC, cache.v_BKCH, strict=True):
        x, (k, v) = block.apply({"params": layer}, x, pos_B1, allowed, (k, v), slot)
        new_k.append(k)
        new_v.append(v)
    x = RMSNorm(config.rms_norm_eps, dt).apply({"params": params["final_norm"]}, x)
    logits = _head(params, x, config, dt)
    cache = KVCache(
        k_BKHC=tuple(new_k),
        v_BKCH=tuple(new_v),
        pos_BC=pos_BC,
        index=cache.index + 1,
        next_pos_B=cache.next_pos_B + 1,
    )
    return logits[:, 0], cache

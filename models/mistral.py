"""The Mistral / Llama decoder: `Transformer`, its full-sequence `forward` and its parameters.

Shapes are named by suffix as in `models.layers`. Layers are stacked on a leading L axis by
`nn.scan` (one compiled layer, any depth). Generation (`models.inference`) runs the same
`Transformer`: a prefill fills a cache, a decode step feeds one token per row.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.kv_cache import KVCache
from models.layers import Block, Dtype, Embedder, LMHead, RMSNorm, allowed_keys, packed_allowed

REMAT_POLICIES = {
    "none": None,  # keep every activation (no rematerialisation)
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
    """Mistral/Llama decoder: training, scoring, prefill and decode steps alike.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters created by
    `init`; logits are always float32. `remat` names a rematerialisation policy per layer;
    `attention` the attention kernel (`models.attention.ATTENTION`; "auto": per backend).
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    attention: str = "auto"

    @nn.compact
    def __call__(
        self,
        tokens_BT,
        pos_BT,
        allowed_BTU,
        *,
        kv: KVCache | None = None,
        prefix_kv=None,
        keep_kv: int = 0,
        mask_kind: str = "any",
        return_hidden: bool = False,
        logits_from: int = 0,
        logits_at_R=None,
    ):
        """Returns (float32 logits, keys and values).

        Logits: [B, T - logits_from, V] (a negative `logits_from` counts from the end), or
        [R, V] at the flat indices `logits_at_R` into the B * T positions; `return_hidden`
        gives the final-norm hidden states [B, T, D] instead.
        With `kv` (a decode step; `allowed_BTU` spans its slots), the layers run one by one,
        each from its own weights `layers_{i}` (`models.inference.unstack_layers`) and its own
        cache buffers, written in place: the keys and values returned are the layers' written
        `LayerKV`s. Otherwise every row first sees `prefix_kv` (keys, values [L, F, K, H] of a
        shared prefix) when given, and the keys and values returned are those of the newest
        `keep_kv` tokens, [L, B, keep_kv, K, H] (None for 0). `mask_kind` says what `allowed_BTU`
        is known to be (`models.attention.MASK_KINDS`: "causal" lets a fused kernel skip blocks).
        """
        c = self.config
        embed = Embedder(c.vocab_size, c.hidden_size, self.dtype, self.param_dtype, name="embed")
        x = nn.with_logical_constraint(embed(tokens_BT), ("batch", "length", "embed"))
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; allowed: {', '.join(REMAT_POLICIES)}")
        dtypes = (self.dtype, self.param_dtype)
        if kv is None and self.has_variable("params", "layers_0"):
            # weights unstacked for decoding (`models.inference.unstack_layers`): a prefill runs
            # layer by layer from them too, so a sampler needs no stacked copy of its weights
            kept = []
            for i in range(c.num_hidden_layers):
                kw = dict(attention=self.attention, mask_kind=mask_kind, name=f"layers_{i}")
                block = Block(c, *dtypes, keep_kv, **kw)
                layer_prefix = None if prefix_kv is None else tuple(y[i] for y in prefix_kv)
                x, layer_kv = block(x, pos_BT, allowed_BTU, layer_prefix)
                kept.append(layer_kv)
            new_kv = tuple(jnp.stack(z) for z in zip(*kept, strict=True)) if keep_kv else None
        elif kv is None:
            block = Block
            if self.remat != "none":
                block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0),  # prefix_kv: one per layer
                length=c.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, *dtypes, keep_kv, attention=self.attention, mask_kind=mask_kind, name="layers")
            x, new_kv = layers(x, pos_BT, allowed_BTU, prefix_kv)
        else:
            new_kv = []
            for i, layer_kv in enumerate(kv.layers()):
                block = Block(c, *dtypes, attention=self.attention, name=f"layers_{i}")
                x, layer_kv = block(x, pos_BT, allowed_BTU, kv=layer_kv)
                new_kv.append(layer_kv)
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="final_norm")(x)
        if return_hidden:
            return x, new_kv
        # the vocabulary head only where logits are wanted
        if logits_at_R is None:
            x = x[:, logits_from:]
        else:
            x = x.reshape(-1, x.shape[-1])[logits_at_R][:, None]
        if c.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = LMHead(c.hidden_size, c.vocab_size, *dtypes, name="lm_head")(x)
        return (logits if logits_at_R is None else logits[:, 0]), new_kv


def positions_from_mask(mask_BT: jax.Array) -> jax.Array:
    """Token positions counted over real tokens only, so padding never shifts RoPE (design §1)."""
    return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def _boxed_params(model: Transformer, rng: jax.Array):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return model.init(rng, tokens, tokens, jnp.ones((1, 1, 1), bool))["params"]


def init_params(config: ModelConfig, rng: jax.Array, *, param_dtype="float32"):
    """Random parameters (normal(0.02) kernels, unit norms) as a plain pytree."""
    return nn.unbox(_boxed_params(Transformer(config, param_dtype=jnp.dtype(param_dtype)), rng))


def logical_axes(config: ModelConfig):
    """The parameter tree's logical axis names, as a pytree of `PartitionSpec`s."""
    abstract = jax.eval_shape(lambda: _boxed_params(Transformer(config), jax.random.key(0)))
    return nn.get_partition_spec(abstract)


def forward(
    params,
    tokens_BT,
    mask_BT,
    *,
    config: ModelConfig,
    dtype="float32",
    remat: str = "none",
    attention: str = "auto",
    return_hidden: bool = False,
    logits_from: int = 0,
) -> jax.Array:
    """Full-sequence forward: float32 logits [B, T - logits_from, V] (or hidden [B, T, D]).

    Padding may sit on either side; positions come from `mask_BT`. `logits_from` skips the
    vocabulary projection for the first positions (a prompt's tokens need no logits).
    `attention` picks the attention kernel (`models.attention.choose_attention`).
    """
    pos = positions_from_mask(mask_BT)
    idx = jnp.arange(tokens_BT.shape[1])
    valid_pos = jnp.where(mask_BT.astype(bool), pos, -1)
    # causal by sequence index (padding sits outside the real tokens) and valid, windowed keys
    allowed = allowed_keys(
        jnp.broadcast_to(idx, tokens_BT.shape),
        jnp.where(valid_pos >= 0, idx, -1),
        config.sliding_window,
    )
    model = Transformer(config, dtype=jnp.dtype(dtype), remat=remat, attention=attention)
    out, _ = model.apply(
        {"params": params},
        tokens_BT,
        pos,
        allowed,
        mask_kind="causal",
        return_hidden=return_hidden,
        logits_from=logits_from,
    )
    return out


def forward_packed(
    params,
    tokens_GW,
    pos_GW,
    segment_GW,
    branch_GW,
    logits_at_J,
    *,
    config: ModelConfig,
    dtype="float32",
    remat: str = "none",
    attention: str = "auto",
) -> jax.Array:
    """Forward over packed lines: float32 logits [J, V] at the flat indices `logits_at_J` into
    the G * W slots.

    Each line holds segments end to end (`segment_GW`, -1 on padding); a segment is a trunk
    (`branch_GW` 0, e.g. a prompt) and branches (1, 2, ...: its responses) that see the trunk
    and themselves only, at positions `pos_GW` continuing from the trunk (design §1).
    `attention` picks the attention kernel (`models.attention.choose_attention`).
    """
    allowed = packed_allowed(segment_GW, branch_GW, pos_GW, config.sliding_window)
    model = Transformer(config, dtype=jnp.dtype(dtype), remat=remat, attention=attention)
    logits, _ = model.apply(
        {"params": params}, tokens_GW, pos_GW, allowed, mask_kind="causal", logits_at_R=logits_at_J
    )
    return logits

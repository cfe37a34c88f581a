"""Attention kernels and which one a backend gets: the einsum path or
`jax.nn.dot_product_attention` (XLA's, or cuDNN's fused flash attention).

Shapes are named by suffix as in `models.layers`: B batch, T queries, S keys, N query heads,
K key/value heads, G = N / K, H head_dim. Every path takes the same boolean mask
`allowed_BTS`; the fused paths get it as `mask` (cuDNN turns it into an additive bias
[B, 1, T, S], read tile by tile) plus `is_causal` where the mask lies under the diagonal.
Sequence lengths cannot say it instead: they count valid keys from the start, and our prompts
are left-padded and our packed lines hold segments and branches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models.backend import matmul_dtype

ATTENTION = ("auto", "einsum", "xla", "cudnn")
# what `allowed_BTS` is known to be, statically:
#   "causal": within index-causal attention, T == S (padded rows, packed lines, windows inside)
#   "any": anything (a prefill after a shared prefix: S = P + T, packed prompts)
#   "decode": one query row per sequence over the cache's slots
MASK_KINDS = ("causal", "any", "decode")
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: fully-masked rows stay NaN-free
CUDNN_MAX_HEAD_DIM = 128  # cuDNN's flash attention: <= 128 before Hopper, 256 from it


def choose_attention(
    requested: str,
    *,
    backend: str,
    dtype,
    mask_kind: str,
    lengths: tuple[int, int] = (2, 2),
    head_dim: int = 64,
) -> str:
    """The kernel that runs: "einsum", "xla" or "cudnn" (a pure function, tested on a CPU).

    `requested` is one of `ATTENTION`; "auto" picks the einsum path on a CPU (faster there),
    cuDNN on a CUDA GPU in bfloat16/float16 where its flash kernel takes the shapes
    (`lengths` (T, S) even: a bias in training needs it; `head_dim` a multiple of 8, at most
    128), else XLA's `dot_product_attention` (TPU, ROCm, float32 on a GPU). A decode step
    (`mask_kind` "decode": one query row) always takes the einsum path over its cache layout.
    """
    if requested not in ATTENTION:
        raise ValueError(f"attention={requested!r}; allowed: {', '.join(ATTENTION)}")
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask_kind={mask_kind!r}; known: {', '.join(MASK_KINDS)}")
    if mask_kind == "decode" or requested == "einsum" or (requested == "auto" and backend == "cpu"):
        return "einsum"
    if requested != "auto":
        return requested
    fits = all(n % 2 == 0 for n in lengths) and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if backend == "gpu" and half and fits else "xla"


def current_backend() -> str:
    """`jax.default_backend()`, with a ROCm GPU told apart from a CUDA one ("rocm": no cuDNN)."""
    backend = jax.default_backend()
    if backend == "gpu":
        version = getattr(jax.devices()[0].client, "platform_version", "")
        if "rocm" in str(version).lower():
            return "rocm"
    return backend


def einsum_attention(q_BTKGH, key, val, allowed_BTS, *, layouts=("bskh", "bskh")):
    """Attention through float32 logits [B, K, G, T, S] and a float32 softmax: [B, T, N, H].

    `layouts` are the keys' and values' einsum layouts: [B, S, K, H] each, or a decode step's
    cache ("bkhs", "bksh": plain batched matmuls). T (1 in decode) is folded into the groups.
    """
    b, t, k, g, h = q_BTKGH.shape
    dtype = q_BTKGH.dtype
    q = q_BTKGH.transpose(0, 2, 3, 1, 4).reshape(b, k, -1, h)
    logits = jnp.einsum(
        f"bkqh,{layouts[0]}->bkqs", q, key.astype(dtype), preferred_element_type=jnp.float32
    )
    logits = logits.reshape(b, k, g, t, logits.shape[-1]) * (h**-0.5)
    logits = jnp.where(allowed_BTS[:, None, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)  # softmax in float32
    probs = probs.reshape(b, k, -1, probs.shape[-1])
    out = jnp.einsum(
        f"bkqs,{layouts[1]}->bkqh",
        probs,
        val.astype(dtype),
        preferred_element_type=matmul_dtype(probs),
    ).astype(dtype)
    return out.reshape(b, k, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, h)


def fused_attention(q_BTKGH, k_BSKH, v_BSKH, allowed_BTS, *, implementation: str, causal: bool):
    """`jax.nn.dot_product_attention` ("xla" or "cudnn") under the same mask: [B, T, N, H].

    Query head n = k * G + g uses kv head k, as the einsum path groups them. `causal` (the mask
    lies under the diagonal, T == S) lets cuDNN skip the blocks above it.
    """
    b, t, k, g, h = q_BTKGH.shape
    dtype = q_BTKGH.dtype
    return jax.nn.dot_product_attention(
        q_BTKGH.reshape(b, t, k * g, h),
        k_BSKH.astype(dtype),
        v_BSKH.astype(dtype),
        mask=allowed_BTS[:, None],
        scale=h**-0.5,
        is_causal=causal,
        implementation=implementation,
    ).astype(dtype)


def attend(q_BTKGH, key, val, allowed_BTS, *, attention: str, mask_kind: str, layouts=None):
    """Attention [B, T, N, H] by the kernel `choose_attention` picks on the current backend.

    `key`, `val`: [B, S, K, H], or a decode step's cache in `layouts` (see `einsum_attention`).
    """
    b, t, _, _, h = q_BTKGH.shape
    kernel = choose_attention(
        attention,
        backend=current_backend(),
        dtype=q_BTKGH.dtype,
        mask_kind=mask_kind,
        lengths=(t, allowed_BTS.shape[-1]),
        head_dim=h,
    )
    if kernel == "einsum":
        return einsum_attention(q_BTKGH, key, val, allowed_BTS, layouts=layouts or ("bskh",) * 2)
    return fused_attention(
        q_BTKGH, key, val, allowed_BTS, implementation=kernel, causal=mask_kind == "causal"
    )

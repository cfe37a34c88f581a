"""XLA workarounds (mostly XLA:CPU) that the model code calls in place of the plain jnp ops."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def matmul_dtype(x: jax.Array):
    """Result dtype of a matmul of `x`: float32 for bfloat16 operands on a CPU.

    XLA:CPU multiplies bfloat16 at twice the float32 rate (AVX512-BF16) only into a float32
    result; for a bfloat16 result it converts both operands to float32 first.
    """
    return jnp.float32 if x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu" else None


@jax.custom_vjp
def _cpu_matmul(x, w):
    return jnp.matmul(x, w, preferred_element_type=matmul_dtype(x))


def _cpu_matmul_fwd(x, w):
    return _cpu_matmul(x, w), (x, w)


def _cpu_matmul_bwd(res, g_TF):
    # the gradient [T, F] stays as it is; the smaller activation [T, D] and kernel [D, F] are
    # transposed instead (XLA:CPU otherwise copies g transposed for the kernel's gradient)
    x_TD, w_DF = res
    g = g_TF.astype(x_TD.dtype)
    dx = jnp.matmul(g, w_DF.T, preferred_element_type=matmul_dtype(g)).astype(x_TD.dtype)
    dw = jnp.matmul(x_TD.T, g, preferred_element_type=matmul_dtype(g)).astype(w_DF.dtype)
    return dx, dw


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [T, D] @ w [D, F]`; on a CPU with a backward that transposes the small operands."""
    if jax.default_backend() == "cpu":
        return _cpu_matmul(x, w)
    return jnp.matmul(x, w, preferred_element_type=matmul_dtype(x))


def project(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`einsum(eq, x, w)` of an activation and a kernel, as one matmul where the axes allow."""
    ins, out = eq.split("->")
    x_dims, w_dims = ins.split(",")
    m = len(w_dims) - len(set(w_dims) & set(out))  # contracted axes: x's last, w's first
    if x_dims[-m:] == w_dims[:m] and out == x_dims[:-m] + w_dims[m:]:
        # one matmul over the merged axes: einsum may contract them in another order,
        # which makes XLA transpose (copy) the kernel at every call
        k = math.prod(w.shape[:m])
        y = matmul(x.reshape(-1, k), w.reshape(k, -1))
        return y.reshape(*x.shape[:-m], *w.shape[m:])
    return jnp.einsum(eq, x, w, preferred_element_type=matmul_dtype(x))


def write_in_place(buf: jax.Array, update: jax.Array, start) -> jax.Array:
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


def set_in_place(buf: jax.Array, update: jax.Array, index) -> jax.Array:
    """`buf.at[index].set(update)`, bfloat16 moved as uint16 bits as in `write_in_place`:
    XLA:CPU computes a bfloat16 scatter in float32, a float32 copy of every buffer it fills."""
    update = update.astype(buf.dtype)
    if buf.dtype != jnp.bfloat16:
        return buf.at[index].set(update)
    bits = jax.lax.bitcast_convert_type
    out = bits(buf, jnp.uint16).at[index].set(bits(update, jnp.uint16))
    return bits(out, jnp.bfloat16)

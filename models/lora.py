"""Low-rank adapters (LoRA, Hu et al. 2021) as pure functions of the parameter tree.

An adapter adds (alpha / rank) · A @ B to a projection kernel W. `num_adapters` > 1 is BPO's
ensemble (design §3): adapters trained on the same pairs, sampled from through their merge, which
is the exact mean of their weight updates, W + mean_e (alpha / rank) · A_e @ B_e.

Kernels keep the model's layout (layers stacked on axis 0): q/k/v [L, D, n, H] (input D),
o [L, N, H, D] (input N·H), gate/up [L, D, F], down [L, F, D]. A is [E, L, *in, r] and B is
[E, L, r, *out], so the update needs no reshape.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from models.config import ModelConfig
from models.mistral import logical_axes

# projection -> (module, number of input axes after the layer axis)
TARGETS = {
    "q_proj": ("attn", 1), "k_proj": ("attn", 1), "v_proj": ("attn", 1), "o_proj": ("attn", 2),
    "gate_proj": ("mlp", 1), "up_proj": ("mlp", 1), "down_proj": ("mlp", 1),
}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = tuple(TARGETS)
    num_adapters: int = 1

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"unknown LoRA target {unknown[0]!r}; allowed: {', '.join(TARGETS)}")
        if self.rank <= 0 or self.num_adapters <= 0:
            raise ValueError(f"LoRA rank={self.rank} and num_adapters={self.num_adapters} "
                             "must be positive")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _kernel(params, name):
    module, _ = TARGETS[name]
    return params["layers"][module][name]["kernel"]


def init_lora(params, spec: LoraSpec, rng: jax.Array, *, dtype="float32"):
    """Adapters for `params`: A ~ N(0, 1/fan_in) (a different draw per adapter), B = 0."""
    lora = {}
    for name, key in zip(spec.targets, jax.random.split(rng, len(spec.targets)), strict=True):
        w = _kernel(params, name)
        n_in = TARGETS[name][1]
        in_shape, out_shape = w.shape[1:1 + n_in], w.shape[1 + n_in:]
        lead = (spec.num_adapters, w.shape[0])
        std = 1.0 / math.sqrt(math.prod(in_shape))
        lora[name] = {
            "a": (std * jax.random.normal(key, (*lead, *in_shape, spec.rank))).astype(dtype),
            "b": jnp.zeros((*lead, spec.rank, *out_shape), dtype),
        }
    return lora


def _update(a, b, n_in: int, scale: float):
    """(alpha / rank) · A @ B over the rank axis, for one adapter or their mean."""
    letters = "stuvwxy"  # axis letters; e, l, r are the adapter, layer and rank axes
    ins, outs = letters[:n_in], letters[n_in:n_in + b.ndim - 3]
    return scale * jnp.einsum(f"el{ins}r,elr{outs}->l{ins}{outs}", a, b) / a.shape[0]


def merge(params, lora, spec: LoraSpec, *, adapter: int | jax.Array | None = None):
    """`params` with adapter `adapter`'s update added, or (None) the mean of all updates."""
    layers = {m: dict(v) for m, v in params["layers"].items()}
    for name, ab in lora.items():
        module, n_in = TARGETS[name]
        a, b = ab["a"], ab["b"]
        if adapter is not None:
            a = jax.lax.dynamic_index_in_dim(a, adapter, 0, keepdims=True)
            b = jax.lax.dynamic_index_in_dim(b, adapter, 0, keepdims=True)
        w = layers[module][name]["kernel"]
        layers[module][name] = {"kernel": w + _update(a, b, n_in, spec.scale).astype(w.dtype)}
    return {**params, "layers": layers}


def lora_logical_axes(config: ModelConfig, spec: LoraSpec):
    """Logical axis names of the adapter tree (for sharding rules), as `PartitionSpec`s."""
    axes = logical_axes(config)
    out = {}
    for name in spec.targets:
        module, n_in = TARGETS[name]
        names = tuple(axes["layers"][module][name]["kernel"])  # ("layers", *in, *out)
        ins, outs = names[1:1 + n_in], names[1 + n_in:]
        out[name] = {"a": PartitionSpec("adapters", "layers", *ins, "lora_rank"),
                     "b": PartitionSpec("adapters", "layers", "lora_rank", *outs)}
    return out

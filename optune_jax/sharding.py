"""The device mesh and the one table that maps the model's logical axes onto it.

    layout = Layout(make_mesh((1, -1, 1)),         # (data, fsdp, tensor); -1: the rest
                    make_rules([("embed", None)]))  # DEFAULT_RULES with overrides
    params = init_sharded_params(config, key, layout)  # created sharded, never gathered
    state, shardings = optimizer.create_state(params, tx, layout.mesh)  # (optune_jax.optimizer)
    step = jit_train_step(fn, layout, state_shardings=shardings,
                          batch_sharding=batch_sharding(layout, micro_batch_size, axis=1))
    decode_params = to_decode_layout(config, layout, "bfloat16")(params)  # once per generate

Model code speaks only logical names (models/layers.py); this file alone knows mesh axes.
Activation constraints (`nn.with_logical_constraint`) take effect inside `rules_context`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from models import ModelConfig, init_params, logical_axes, unstack_layers
from optune_jax.run.schema import MESH_AXES  # ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Priority order (flax's rule semantics): an activation [batch, length, embed] takes `fsdp` for
# its batch first, so its embed stays whole; a kernel [embed, mlp] has no batch, so its embed
# takes `fsdp` (ZeRO-3: gathered per layer when used) and mlp takes `tensor` (Megatron split).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("adapters", None),  # LoRA (models/lora.py)
    ("lora_rank", None),
)


# The decode layout (MaxText's and tunix's serving layout): every device of fsdp x tensor holds
# a slice of the heads, kv heads, mlp and vocab (Megatron) and the embed dim whole, so a decode
# step multiplies by its own shard and all-reduces activations, never gathering a weight (an
# FSDP gather per layer per step, or all of them hoisted out of the loop and kept); rows split
# over data. Dims the devices do not divide (3 kv heads on 8) stay whole (`logical_sharding`).
INFERENCE_RULES: Rules = (
    ("batch", "data"),
    ("length", None),
    ("vocab", ("fsdp", "tensor")),
    ("embed", None),
    ("heads", ("fsdp", "tensor")),
    ("kv_heads", ("fsdp", "tensor")),
    ("mlp", ("fsdp", "tensor")),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("adapters", None),
    ("lora_rank", None),
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the rules that map logical axes onto it: where every array of a run lives."""

    mesh: Mesh
    rules: Rules = DEFAULT_RULES

    def decoding(self) -> Layout:
        """The same mesh under INFERENCE_RULES (the sampler's layout)."""
        return Layout(self.mesh, INFERENCE_RULES)


def make_rules(overrides: Sequence[Sequence[str | None]] = ()) -> Rules:
    """DEFAULT_RULES with entries replaced: each override is (logical name, *mesh axes).

    `("embed", None)` replicates `embed`; `("batch", "data")` shards batch over `data` only.
    """
    known = {name for name, _ in DEFAULT_RULES}
    table = dict(DEFAULT_RULES)
    for name, *axes in overrides:
        if name not in known:
            raise ValueError(f"mesh.rules: unknown logical axis {name!r}; known: {sorted(known)}")
        bad = [a for a in axes if a is not None and a not in MESH_AXES]
        if bad or (None in axes and len(axes) > 1) or not axes:
            raise ValueError(
                f"mesh.rules: {name!r} needs mesh axes from {MESH_AXES} or one null, got {axes}"
            )
        table[name] = None if axes == [None] else (axes[0] if len(axes) == 1 else tuple(axes))
    return tuple(table.items())


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) with one -1 filled in so that the product is `num_devices`."""
    shape = tuple(int(s) for s in shape)
    fixed = math.prod(s for s in shape if s != -1)
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be positive, with at most one -1")
    if shape.count(-1):
        if num_devices % fixed:
            raise ValueError(f"mesh shape {shape} does not divide {num_devices} devices")
        shape = tuple(num_devices // fixed if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, have {num_devices}")
    return shape


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices=None) -> Mesh:
    """A mesh over `devices` (default: every device of every process) with axes MESH_AXES.

    In a single process, sizes without -1 that need fewer devices take the first ones.
    """
    devices = jax.devices() if devices is None else list(devices)
    if -1 not in shape and jax.process_count() == 1:
        devices = devices[: math.prod(shape)]
    sizes = resolve_shape(shape, len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


@contextlib.contextmanager
def rules_context(layout: Layout):
    """Activation constraints on: logical names resolve through `rules` onto `mesh`'s axes.

    Works around a jitted call or inside a traced function (see `with_rules`).
    """
    abstract = layout.mesh.abstract_mesh
    with jax.sharding.use_abstract_mesh(abstract), nn.logical_axis_rules(layout.rules):
        yield


def with_rules(fn, layout: Layout):
    """`fn` traced under `rules_context`, so jitting it needs no context at the call site."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with rules_context(layout):
            return fn(*args, **kwargs)

    return wrapped


def _divisible(axes, dim: int, mesh: Mesh):
    """The longest prefix of `axes` whose devices divide `dim` (None: the dim stays whole)."""
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return None if not axes else axes[0] if len(axes) == 1 else axes


def logical_sharding(shape, names, layout: Layout) -> NamedSharding:
    """The sharding of an array of `shape` whose dims carry logical `names` (None: unnamed).

    A dim the mapped mesh axes do not divide drops axes from the end until they do (a batch of
    1 prompt, 2 kv heads on 4 tensor devices): correct, only less parallel.
    """
    spec, mesh = nn.logical_to_mesh_axes(tuple(names), layout.rules), layout.mesh
    return NamedSharding(
        mesh, PartitionSpec(*(_divisible(a, d, mesh) for a, d in zip(spec, shape, strict=False)))
    )


def tree_shardings(abstract, specs, layout: Layout):
    """`logical_sharding` for each leaf of `abstract` with the logical `specs` tree."""
    return jax.tree.map(lambda x, s: logical_sharding(x.shape, s, layout), abstract, specs)


def param_shardings(config: ModelConfig, layout: Layout):
    """NamedSharding of every parameter of `config`'s model (no weights are allocated)."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return tree_shardings(abstract, logical_axes(config), layout)


def _unstacked(shardings, depth: int):
    """Parameter shardings with the stacked `layers` [L, ...] split as `unstack_layers` does."""
    drop_layers = lambda s: NamedSharding(s.mesh, PartitionSpec(*s.spec[1:]))
    layer = jax.tree.map(drop_layers, shardings["layers"])
    rest = {k: v for k, v in shardings.items() if k != "layers"}
    return {**rest, **{f"layers_{i}": layer for i in range(depth)}}


def decode_shardings(config: ModelConfig, mesh: Mesh):
    """NamedSharding of every parameter in the decode layout (INFERENCE_RULES), the layers
    unstacked into `layers_{i}` as `models.unstack_layers` does: a decode step reads each
    layer's weights in place instead of slicing (copying) them from the stack."""
    stacked = param_shardings(config, Layout(mesh, INFERENCE_RULES))
    return _unstacked(stacked, config.num_hidden_layers)


@functools.cache
def to_decode_layout(config: ModelConfig, layout: Layout, dtype: str):
    """The program that copies `config`'s parameters from their `layout` into the decode
    layout (`decode_shardings`) in the compute `dtype`, compiled once per arguments: run it
    once per call of `generate`, which then runs under `rules_context(layout.decoding())`."""
    source = _unstacked(param_shardings(config, layout), config.num_hidden_layers)

    def copy(params):
        # each layer's slice cast in its own shards, then moved: no float32 or whole-stack
        # copy of the weights in flight (XLA would otherwise move the stacks, then slice)
        cast = lambda w, s: jax.lax.with_sharding_constraint(w.astype(dtype), s)
        return jax.tree.map(cast, unstack_layers(params), source)

    return jax.jit(copy, out_shardings=decode_shardings(config, layout.mesh))


def batch_sharding(layout: Layout, rows: int, *, axis: int = 0) -> NamedSharding:
    """Arrays whose dim `axis` holds `rows` examples, split over the data axes that divide it.

    A NamedSharding also serves as a pytree prefix: one sharding for a whole dict of batch
    arrays (`*_AM...` with axis=1; rows `*_RT` with axis=0), trailing dims replicated.
    """
    return logical_sharding((1,) * axis + (rows,), (None,) * axis + ("batch",), layout)


def split_count(sharding: NamedSharding, axis: int) -> int:
    """How many parts `sharding` splits dim `axis` into (1: whole)."""
    spec = tuple(sharding.spec) + (None,) * (axis + 1)
    axes = spec[axis]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(sharding.mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def init_sharded_params(
    config: ModelConfig, rng, layout: Layout, *, param_dtype="float32"
):
    """Random parameters created directly in their shards (`jit(init, out_shardings)`)."""
    init = functools.partial(init_params, config, param_dtype=param_dtype)
    return jax.jit(init, out_shardings=param_shardings(config, layout))(rng)


def jit_train_step(
    step_fn, layout: Layout, *, state_shardings, batch_sharding, frozen_shardings=None
):
    """`step_fn(state, batch, frozen) -> (state, metrics)` jitted once with explicit shardings:
    the state keeps its shardings and is donated, the batch is split over the data axes,
    metrics come back replicated (readable on every host)."""
    return jax.jit(
        with_rules(step_fn, layout),
        in_shardings=(state_shardings, batch_sharding, frozen_shardings),
        out_shardings=(state_shardings, replicated(layout.mesh)),
        donate_argnums=(0,),
    )


def per_device_bytes(tree) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs with shardings)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total

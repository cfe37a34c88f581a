"""The optimizer, its learning-rate schedule (design §7; the one place `train.schedule` is read)
and the state it updates, created in its shards.

`build_optimizer(train, updates_per_iteration=, iterations=)` gives every trainer (and the dry
run) its `OptimizerPlan`: the optax transformation and whether each iteration restarts it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from optune_jax import sharding
from optune_jax.run.schema import TrainSection


class ScheduleState(NamedTuple):
    """Where the learning-rate schedule stands: `count` updates into a run of `run_steps`
    updates whose first `run_warmup` warm up (a restart sets the last two, `fresh_opt_state`)."""

    count: jax.Array
    run_steps: jax.Array
    run_warmup: jax.Array


def warmup_steps(warmup_ratio: float, steps: int) -> int:
    """TRL's warm-up length of a run of `steps` updates (transformers' `get_warmup_steps`)."""
    return math.ceil(warmup_ratio * steps)


def scale_by_linear_schedule(
    learning_rate: float, *, steps: int, warmup_ratio: float, decay: bool
) -> optax.GradientTransformation:
    """Updates times -learning_rate × the factor of transformers'
    `get_linear_schedule_with_warmup` at update c of a run of N updates, W warming up:
    c / W while c < W (0 at the first update), then (N - c) / (N - W) down to 0 (`decay`) or 1.
    N and W live in the state, so a restart over another N needs no new program."""

    def init(params):
        del params
        n, w = (jnp.asarray(x, jnp.int32) for x in (steps, warmup_steps(warmup_ratio, steps)))
        return ScheduleState(jnp.zeros((), jnp.int32), n, w)

    def update(updates, state, params=None):
        del params
        c, n, w = (x.astype(jnp.float32) for x in state)
        after = jnp.maximum(n - c, 0.0) / jnp.maximum(n - w, 1.0) if decay else 1.0
        rate = -learning_rate * jnp.where(c < w, c / jnp.maximum(w, 1.0), after)
        updates = jax.tree.map(lambda u: jnp.asarray(rate, u.dtype) * u, updates)
        return updates, state._replace(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def make_optimizer(
    *,
    name: str,
    learning_rate: float,
    total_steps: int,
    warmup_ratio: float,
    weight_decay: float,
    max_grad_norm: float | None,
    decay: bool = False,
) -> optax.GradientTransformation:
    """Global-norm clipping, then PyTorch's `torch.optim.RMSprop` defaults as TRL trains with
    them (design §7: alpha 0.99, eps 1e-8 outside the square root, weight decay added to the
    gradient) or `torch.optim.AdamW`'s, over the linear schedule of a run of `total_steps`
    updates (`scale_by_linear_schedule`; `decay`: down to 0 after the warm-up, else constant)."""
    schedule = scale_by_linear_schedule(
        learning_rate, steps=total_steps, warmup_ratio=warmup_ratio, decay=decay
    )
    if name == "rmsprop":
        parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
        parts.append(optax.scale_by_rms(decay=0.99, eps=1e-8, eps_in_sqrt=False))
    elif name == "adamw":  # decoupled weight decay, scaled by the schedule like the step
        parts = [optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)]
        parts += [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    else:
        raise ValueError(f"unknown optimizer {name!r}; known: rmsprop, adamw")
    clip = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm is not None else []
    return optax.chain(*clip, *parts, schedule)


def fresh_opt_state(optimizer: optax.GradientTransformation, params, steps, warmup):
    """The optimizer state a new run starts from (zero moments, the schedule at its first
    update) over `steps` updates of which `warmup` warm up (`warmup_steps`)."""
    return optax.tree_utils.tree_set(
        optimizer.init(params),
        run_steps=jnp.asarray(steps, jnp.int32),
        run_warmup=jnp.asarray(warmup, jnp.int32),
    )


def updates(train: TrainSection, pairs: int) -> int:
    """Optimizer updates in `train.epochs` passes over `pairs` pairs, `train.batch_size` a step."""
    return train.epochs * math.ceil(pairs / train.batch_size)


@dataclasses.dataclass(frozen=True)
class OptimizerPlan:
    """The optimizer a run trains with; `restarts`: `train.schedule: per_iteration`, each
    iteration a run of its own (design §7), its state made afresh (`restart_args`)."""

    transform: optax.GradientTransformation
    restarts: bool
    warmup_ratio: float

    def restart_args(self, steps: int) -> tuple[int, int]:
        """(updates, warm-up updates) of a restarted run of `steps` updates."""
        return steps, warmup_steps(self.warmup_ratio, steps)


def build_optimizer(
    t: TrainSection, *, updates_per_iteration: int, iterations: int = 1
) -> OptimizerPlan:
    """The `train` section's optimizer: with `schedule: per_iteration` (TRL's) decaying to 0
    over each iteration's updates, restarted every iteration; `continuous`: one constant
    schedule over all `iterations`."""
    restarts = t.schedule == "per_iteration"
    total = updates_per_iteration if restarts else updates_per_iteration * iterations
    transform = make_optimizer(
        name=t.optimizer,
        learning_rate=t.learning_rate,
        total_steps=total,
        warmup_ratio=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        decay=restarts,
    )
    return OptimizerPlan(transform, restarts, t.warmup_ratio)


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def state_shardings(
    optimizer: optax.GradientTransformation, params_abstract, params_sharding, mesh
):
    """TrainState shardings: moments shaped like the params shard like them, counters replicate."""
    opt_abstract = jax.eval_shape(optimizer.init, params_abstract)
    opt = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        opt_abstract,
        params_sharding,
        transform_non_params=lambda _: sharding.replicated(mesh),
    )
    return TrainState(step=sharding.replicated(mesh), params=params_sharding, opt_state=opt)


def create_state(params, optimizer: optax.GradientTransformation, mesh: Mesh):
    """(TrainState, its shardings) around already-placed `params`; the optimizer state is
    created in its shards by `jit(init, out_shardings)`, never replicated first."""
    shardings = state_shardings(optimizer, params, jax.tree.map(lambda x: x.sharding, params), mesh)
    step, opt_state = jax.jit(
        lambda p: (jnp.zeros((), jnp.int32), optimizer.init(p)),
        out_shardings=(shardings.step, shardings.opt_state),
    )(params)
    return TrainState(step, params, opt_state), shardings

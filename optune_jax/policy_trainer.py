"""Phase: epochs of the configured loss over D_t on the mesh (design §4 step 7)."""

from __future__ import annotations

import functools

import jax
import numpy as np

from models import ModelConfig
from optune_jax import sharding
from optune_jax.batch import PairBatch, micro_batches
from optune_jax.optimizer import OptimizerPlan, fresh_opt_state, updates
from optune_jax.packing import key_cost, pack_batch
from optune_jax.run.guard import NonFiniteGuard
from optune_jax.run.schema import TrainSection
from optune_jax.run.step_loop import run_steps


class PolicyTrainer:
    """Epochs over D_t through the jitted train step (`components.train_program`) on the mesh."""

    def __init__(
        self,
        train: TrainSection,
        *,
        seed: int,
        step,
        batch_sharding,
        plan: OptimizerPlan,
        state_shardings,
        prompt_len: int,
        model: ModelConfig,
        progress: bool,
    ):
        self.train_cfg, self.seed, self.progress = train, seed, progress
        self.step, self.batch_sharding, self.plan = step, batch_sharding, plan
        self.pack = None  # train.pack: lines split like the pairs, W a multiple of the split
        if train.pack:
            self.pack = functools.partial(
                pack_batch,
                prompt_len=prompt_len,
                shards=sharding.split_count(batch_sharding, 1),
                key_cost=key_cost(model),
                compiled=set(),  # the step's (lines, width) shapes so far
            )
        # `train.schedule: per_iteration`: each iteration starts a new run (design §7), its
        # optimizer state created in place of the old one, in the same shards
        self.restart = jax.jit(
            lambda state, steps, warmup: state.replace(
                opt_state=fresh_opt_state(plan.transform, state.params, steps, warmup)
            ),
            out_shardings=state_shardings,
            donate_argnums=0,
        )

    def _prepare(self, before_step):
        """`run_steps`' before_step: the hook's samples added, then the rows packed."""
        if self.pack is None:
            return before_step

        def prepare(idx, batch, state, n):
            if before_step is not None:
                batch = before_step(idx, batch, state, n)
            return self.pack(batch)

        return prepare

    def train(self, state, batch: PairBatch, t: int, *, guard: NonFiniteGuard, frozen=None,
              before_step=None):
        """(state, metrics) after `train.epochs` passes over the host batch [Q] in a seeded
        order per epoch; `before_step`: HyPO's online-sample hook. Each step's batch is packed
        (after the hook) with `train.pack`. With `train.schedule: per_iteration` the optimizer
        state starts afresh, its schedule over this iteration's steps: a run of its own."""
        cfg, k = self.train_cfg, len(batch.pair_mask)
        steps = updates(cfg, k)
        if self.plan.restarts:
            state = self.restart(state, *self.plan.restart_args(steps))

        def stream():
            for epoch in range(cfg.epochs):
                order = np.random.default_rng([self.seed, t, epoch, 7]).permutation(k)
                yield from micro_batches(
                    batch, order, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size
                )

        state, sums, first = run_steps(
            self.step,
            state,
            stream(),
            frozen=frozen,
            sharding=self.batch_sharding,
            guard=guard,
            where=f"iteration {t}",
            total=steps,
            desc=f"iter {t} train",
            progress=self.progress,
            before_step=self._prepare(before_step),
        )
        out = sums.means()
        # the first step of a phase: with reference π_t, margins (and the KL) are exactly 0; its
        # loss is the yardstick of `divergence.reasons`
        out.update({f"first.{m}": float(first[m]) for m in ("margin", "kl", "loss")
                    if m in first})
        return state, out

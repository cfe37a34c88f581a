"""Phase: epochs of the configured loss over D_t on the mesh (design §4 step 7)."""

from __future__ import annotations

import functools
import math

import jax
import numpy as np

from optune_jax import sharding
from optune_jax.batch import PairBatch, micro_batches
from optune_jax.packing import key_cost, pack_batch
from optune_jax.run.step_loop import run_steps
from optune_jax.train_step import (
    LossChoice,
    NonFiniteGuard,
    PolicySpec,
    fresh_opt_state,
    train_step,
    warmup_steps,
)


class PolicyTrainer:
    """The jitted train step over the mesh and the epoch loop that feeds it."""

    def __init__(
        self,
        cfg,
        *,
        optimizer,
        spec: PolicySpec,
        loss: LossChoice,
        lora,
        mesh,
        rules,
        state_shardings,
        frozen_shardings,
        progress: bool,
    ):
        self.cfg, self.progress = cfg, progress
        t = cfg.train
        self.batch_sharding = sharding.batch_sharding(mesh, rules, t.micro_batch_size, axis=1)
        self.pack = None  # train.pack: lines split like the pairs, W a multiple of the split
        if t.pack:
            self.pack = functools.partial(
                pack_batch,
                prompt_len=cfg.data.max_prompt_tokens,
                shards=sharding.split_count(self.batch_sharding, 1),
                key_cost=key_cost(spec.config),
                compiled=set(),  # the step's (lines, width) shapes so far
            )
        self.step = sharding.jit_train_step(
            functools.partial(
                train_step,
                optimizer=optimizer,
                policy=spec,
                loss=loss,
                prompt_len=cfg.data.max_prompt_tokens,
                lora=lora,
            ),
            mesh,
            rules,
            state_shardings=state_shardings,
            batch_sharding=self.batch_sharding,
            frozen_shardings=frozen_shardings if lora else None,
        )
        # `train.schedule: per_iteration`: each iteration starts a new run (design §7), its
        # optimizer state created in place of the old one, in the same shards
        self.restart = jax.jit(
            lambda state, steps, warmup: state.replace(
                opt_state=fresh_opt_state(optimizer, state.params, steps, warmup)
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

    def steps_per_iteration(self, pairs: int) -> int:
        return self.cfg.train.epochs * math.ceil(pairs / self.cfg.train.batch_size)

    def train(self, state, batch: PairBatch, t: int, *, guard: NonFiniteGuard, frozen=None,
              before_step=None):
        """(state, metrics) after `train.epochs` passes over the host batch [Q] in a seeded
        order per epoch; `before_step`: HyPO's online-sample hook. Each step's batch is packed
        (after the hook) with `train.pack`. With `train.schedule: per_iteration` the optimizer
        state starts afresh, its schedule over this iteration's steps: a run of its own."""
        cfg = self.cfg.train
        k = len(batch.pair_mask)
        if cfg.schedule == "per_iteration":
            n = self.steps_per_iteration(k)
            state = self.restart(state, n, warmup_steps(cfg.warmup_ratio, n))

        def stream():
            for epoch in range(cfg.epochs):
                order = np.random.default_rng([self.cfg.run.seed, t, epoch, 7]).permutation(k)
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
            total=self.steps_per_iteration(k),
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

"""Reward-model training: Bradley–Terry over preference pairs, held-out pairwise accuracy per epoch.

The pure step (`rm_train_step`) scores chosen and rejected in one forward pass; `RewardModelRun`
drives epochs, evaluation, checkpoints, metrics and the transformers export (the edges).
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from losses import bradley_terry_loss
from models import SMOLLM2, load_tokenizer
from models.reward_model import (
    export_reward_checkpoint,
    from_backbone,
    is_reward_checkpoint,
    load_reward_checkpoint,
    score_sequences,
)
from optune_jax import sharding
from optune_jax.batch import ScoredPairBatch
from optune_jax.components import build_layout, load_policy
from optune_jax.data import split_eval
from optune_jax.optimizer import TrainState, build_optimizer, create_state, updates
from optune_jax.rewards.learned import Scorer, place
from optune_jax.rewards.rm_data import (
    PairColumns,
    encode_pairs,
    load_preference_pairs,
    pair_batch,
    score_all,
)
from optune_jax.run.guard import NonFiniteGuard
from optune_jax.run.runner import Runner
from optune_jax.run.schema import RMConfig
from optune_jax.run.step_loop import run_steps
from optune_jax.train_step import accumulated_step

RESUMABLE_CHANGES = (
    "run.output_dir", "run.keep_checkpoints", "mesh", "train.max_skipped_steps",
    "run.compilation_cache",
)


# ------------------------------------------------------------------------------- pure step
def rm_loss(params, micro: ScoredPairBatch, *, config, dtype="float32", remat="none"):
    """Bradley–Terry loss of one micro-batch [M]."""
    m, _, t = micro.tokens.shape
    scores_M2 = score_sequences(
        params,
        micro.tokens.reshape(2 * m, t),
        micro.mask.reshape(2 * m, t),
        config=config,
        dtype=dtype,
        remat=remat,
    ).reshape(m, 2)
    return bradley_terry_loss(scores_M2[:, 0], scores_M2[:, 1], mask=micro.pair_mask)


def rm_train_step(
    state: TrainState, batch: ScoredPairBatch, *, optimizer, config, dtype="float32", remat="none"
):
    """One optimizer step over a `pair_batch` (A micro-batches); returns (state, metrics)."""
    loss_fn = functools.partial(rm_loss, config=config, dtype=dtype, remat=remat)
    return accumulated_step(state, batch, loss_fn, optimizer=optimizer)


# ------------------------------------------------------------------------------------ run
def load_reward_model(cfg: RMConfig):
    """(tokenizer, config, params): a reward checkpoint as it is, or a causal LM / random
    backbone with a fresh score head."""
    m = cfg.model
    if m.checkpoint not in (SMOLLM2, "random") and is_reward_checkpoint(m.checkpoint):
        config, params = load_reward_checkpoint(m.checkpoint, dtype=m.param_dtype)
        tokenizer = load_tokenizer(m.tokenizer or m.checkpoint)
        return tokenizer, config, jax.tree.map(jnp.asarray, params)
    policy, params = load_policy(cfg)
    params = from_backbone(params, policy.config, jax.random.key(cfg.run.seed + 1))
    return policy.tokenizer, policy.config, params


class RewardModelRun(Runner):
    """One reward-model training run in `cfg.run.output_dir` (one step: an epoch)."""

    unit, desc, resumable = "epoch", "reward model", RESUMABLE_CHANGES

    def __init__(self, cfg: RMConfig, *, resume=False, overwrite=False, progress=True):
        self.cfg = cfg
        pairs = self._read_pairs()  # data errors first: they need no model
        self.tokenizer, self.config, params = load_reward_model(cfg)
        self.pad_id = int(self.tokenizer.pad_token_id)
        enc = functools.partial(
            encode_pairs, tokenizer=self.tokenizer, max_tokens=cfg.data.max_tokens
        )
        *self.train, self.train_stats = enc(pairs[0])
        *self.eval, self.eval_stats = enc(pairs[1])
        t = cfg.train
        optimizer = build_optimizer(t, updates_per_iteration=updates(t, len(self.train[0])))
        optimizer = optimizer.transform  # one run: an epoch is a step of the Runner, not a restart
        # weights, optimizer state and batches laid out on the mesh like the policy's
        self.layout = build_layout(cfg.mesh)
        params = place(jax.device_get(params), self.config, self.layout)
        self.state, state_shardings = create_state(params, optimizer, self.layout.mesh)
        self.guard = NonFiniteGuard(t.max_skipped_steps)
        self._open(steps=t.epochs, resume=resume, overwrite=overwrite, progress=progress)
        step = functools.partial(
            rm_train_step,
            optimizer=optimizer,
            config=self.config,
            dtype=cfg.model.dtype,
            remat=cfg.model.remat,
        )
        self._batch_sharding = sharding.batch_sharding(self.layout, t.micro_batch_size, axis=1)
        self._train_step = sharding.jit_train_step(
            lambda state, batch, frozen: step(state, batch),
            self.layout,
            state_shardings=state_shardings,
            batch_sharding=self._batch_sharding,
        )
        self._score = Scorer(self.config, dtype=cfg.model.dtype, layout=self.layout)

    def _read_pairs(self):
        """(train pairs, held-out pairs) as conversations."""
        d = self.cfg.data
        columns = PairColumns(d.prompt_column, d.chosen_column, d.rejected_column)
        pairs = load_preference_pairs(list(d.train_files), columns)
        if d.eval_files:
            return pairs, load_preference_pairs(list(d.eval_files), columns)
        return split_eval(pairs, d.eval_fraction, self.cfg.run.seed)

    def evaluate(self) -> dict:
        """Held-out Bradley–Terry loss, pairwise accuracy (strictly higher chosen score), margin."""
        score = functools.partial(
            score_all,
            self._score,
            self.state.params,
            batch_size=2 * self.cfg.train.micro_batch_size,
            max_len=self.cfg.data.max_tokens,
            pad_id=self.pad_id,
        )
        chosen, rejected = score(self.eval[0]), score(self.eval[1])
        loss, metrics = bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected))
        return {
            "eval.loss": float(loss),
            "eval.accuracy": float(metrics["accuracy"]),
            "eval.margin": float(metrics["margin"]),
        }

    def _epoch(self, epoch: int) -> dict:
        t, d = self.cfg.train, self.cfg.data
        n = len(self.train[0])
        order = np.random.default_rng([self.cfg.run.seed, epoch]).permutation(n)
        batches = (
            (None, pair_batch(
                *self.train,
                order[start : start + t.batch_size],
                batch_size=t.batch_size,
                micro_batch_size=t.micro_batch_size,
                max_len=d.max_tokens,
                pad_id=self.pad_id,
            ))
            for start in range(0, n, t.batch_size)
        )
        self.state, sums, _ = run_steps(
            self._train_step,
            self.state,
            batches,
            sharding=self._batch_sharding,
            guard=self.guard,
            where=f"epoch {epoch}",
            total=math.ceil(n / t.batch_size),
            desc=f"epoch {epoch} train",
            progress=self.progress,
        )
        means = sums.means(keep=("loss", "accuracy", "margin"))
        return {f"train.{k}": v for k, v in means.items()}

    # ------------------------------------------------------------------ Runner's part
    def _before(self) -> dict:
        return {
            **self.evaluate(),
            **{f"data.train_{k}": v for k, v in self.train_stats.items()},
            **{f"data.eval_{k}": v for k, v in self.eval_stats.items()},
        }

    def _step(self, epoch: int) -> dict:
        start = time.perf_counter()
        record = self._epoch(epoch)
        record["seconds.training"] = time.perf_counter() - start
        start = time.perf_counter()
        record |= self.evaluate()
        record["seconds.evaluation"] = time.perf_counter() - start
        return record

    def _line(self, r: dict) -> str:
        nan = float("nan")  # every step of the epoch skipped: no training loss
        return (
            f"epoch {r['iteration']}: train loss {r.get('train.loss', nan):.4f} acc "
            f"{r.get('train.accuracy', nan):.3f}, held-out loss {r['eval.loss']:.4f} "
            f"acc {r['eval.accuracy']:.3f} ({r['seconds.training']:.0f}s)"
        )

    def _host_state(self) -> dict:
        return {"epoch": np.int32(self.next_step)}

    def _export_params(self):
        return self.state.params

    def _write_model(self, params, path) -> None:
        export_reward_checkpoint(params, self.config, path, tokenizer=self.tokenizer)

"""Reward-model training: Bradley–Terry over preference pairs, held-out pairwise accuracy per epoch.

The pure step (`rm_train_step`) scores chosen and rejected in one forward pass; `RewardModelRun`
drives epochs, evaluation, checkpoints, metrics and the transformers export (the edges).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

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
from optune_jax.checkpoint import Checkpoints
from optune_jax.config import (
    POSITIVE,
    MeshSection,
    ModelSection,
    TrainSection,
    _opt,
    _section,
    config_to_dict,
)
from optune_jax.data import split_eval
from optune_jax.metrics_log import MetricsLog
from optune_jax.reward_model import Scorer, place
from optune_jax.rm_data import (
    PairColumns,
    encode_pairs,
    load_preference_pairs,
    pair_batch,
    score_all,
)
from optune_jax.run_dir import prepare_run_dir, replace_dir
from optune_jax.train_step import NonFiniteGuard, TrainState, accumulated_step, make_optimizer

RESUMABLE_CHANGES = ("run.output_dir", "run.keep_checkpoints", "mesh", "train.max_skipped_steps")


# ----------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class RMDataSection:
    train_files: tuple[str, ...] = ("data/rm_ifeval/train.jsonl",)  # json/jsonl/parquet
    eval_files: tuple[str, ...] = ("data/rm_ifeval/heldout.jsonl",)  # empty: split off train
    eval_fraction: float = _opt(0.1, range="(0, 1)")  # held out when eval_files is empty
    prompt_column: str = "prompt"  # text or messages; optional when answers are conversations
    chosen_column: str = "chosen"  # text or a list of {role, content} messages
    rejected_column: str = "rejected"
    max_tokens: int = _opt(256, range=POSITIVE)  # per conversation; longer keep their last tokens


@dataclasses.dataclass(frozen=True)
class RMRunSection:
    output_dir: str = "runs/rm"
    seed: int = 0
    keep_checkpoints: int = _opt(2, range=POSITIVE)


@dataclasses.dataclass(frozen=True)
class RMConfig:
    """`python -m optune_jax.train_rm`'s schema; `model`, `train` and `mesh` are the policy's
    sections (`model.checkpoint` may also be a reward-model directory, to train on). One
    process: the mesh spans this host's devices."""

    model: ModelSection = _section(ModelSection)
    data: RMDataSection = _section(RMDataSection)
    train: TrainSection = _section(TrainSection)
    mesh: MeshSection = _section(MeshSection)
    run: RMRunSection = _section(RMRunSection)


# ------------------------------------------------------------------------------- pure step
def rm_loss(params, micro, *, config, dtype="float32", remat="none"):
    """Bradley–Terry loss of one micro-batch: tokens_M2T, mask_M2T (chosen 0), pair_mask_M."""
    m, _, t = micro["tokens_M2T"].shape
    scores_M2 = score_sequences(
        params,
        micro["tokens_M2T"].reshape(2 * m, t),
        micro["mask_M2T"].reshape(2 * m, t),
        config=config,
        dtype=dtype,
        remat=remat,
    ).reshape(m, 2)
    return bradley_terry_loss(scores_M2[:, 0], scores_M2[:, 1], mask=micro["pair_mask_M"])


def rm_train_step(
    state: TrainState, batch: dict, *, optimizer, config, dtype="float32", remat="none"
):
    """One optimizer step over a `pair_batch` (A micro-batches); returns (state, metrics)."""
    loss_fn = functools.partial(rm_loss, config=config, dtype=dtype, remat=remat)
    return accumulated_step(state, batch, loss_fn, optimizer=optimizer)


# ------------------------------------------------------------------------------------ run
def load_reward_model(cfg: RMConfig):
    """(tokenizer, config, params): a reward checkpoint as it is, or a causal LM / random
    backbone with a fresh score head."""
    from optune_jax.loop import load_policy  # the policy's loader: smollm2, a directory, random

    m = cfg.model
    if m.checkpoint not in (SMOLLM2, "random") and is_reward_checkpoint(m.checkpoint):
        config, params = load_reward_checkpoint(m.checkpoint, dtype=m.param_dtype)
        tokenizer = load_tokenizer(m.tokenizer or m.checkpoint)
        return tokenizer, config, jax.tree.map(jnp.asarray, params)
    policy, params = load_policy(cfg)
    params = from_backbone(params, policy.config, jax.random.key(cfg.run.seed + 1))
    return policy.tokenizer, policy.config, params


class RewardModelRun:
    """One reward-model training run in `cfg.run.output_dir`."""

    def __init__(self, cfg: RMConfig, *, resume=False, overwrite=False, progress=True):
        self.cfg, self.out, self.progress = cfg, Path(cfg.run.output_dir), progress
        pairs = self._read_pairs()  # data errors first: they need no model
        self.tokenizer, self.config, params = load_reward_model(cfg)
        self.pad_id = int(self.tokenizer.pad_token_id)
        enc = functools.partial(
            encode_pairs, tokenizer=self.tokenizer, max_tokens=cfg.data.max_tokens
        )
        *self.train, self.train_stats = enc(pairs[0])
        *self.eval, self.eval_stats = enc(pairs[1])
        prepare_run_dir(
            self.out,
            config_to_dict(cfg),
            resume=resume,
            overwrite=overwrite,
            resumable=RESUMABLE_CHANGES,
        )
        t = cfg.train
        self.optimizer = make_optimizer(
            name=t.optimizer,
            learning_rate=t.learning_rate,
            total_steps=t.epochs * math.ceil(len(self.train[0]) / t.batch_size),
            warmup_ratio=t.warmup_ratio,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
        )
        # weights, optimizer state and batches laid out on the mesh like the policy's
        m = cfg.mesh
        self.mesh = sharding.make_mesh((m.data, m.fsdp, m.tensor))
        self.rules = sharding.make_rules(m.rules)
        params = place(jax.device_get(params), self.config, self.mesh, self.rules)
        self.state, state_shardings = sharding.create_state(params, self.optimizer, self.mesh)
        self.next_epoch = 0
        self.guard = NonFiniteGuard(t.max_skipped_steps)
        self.ckpt = Checkpoints(self.out / "checkpoints", keep=cfg.run.keep_checkpoints)
        if resume:  # from the newest good checkpoint; damaged ones are set aside and named
            found = self.ckpt.restore_newest(
                state_like=self.state, host_like={"epoch": np.zeros((), np.int32)}
            )
            if found.note:
                tqdm.write(f"warning: {found.note}", file=sys.stderr)
            if found.step is not None:
                self.state, self.next_epoch = found.state, found.meta["next_epoch"]
                self.guard.in_a_row = found.meta.get("skipped_in_a_row", 0)
        self.log = MetricsLog(self.out, resume_after=self.next_epoch - 1)
        step = functools.partial(
            rm_train_step,
            optimizer=self.optimizer,
            config=self.config,
            dtype=cfg.model.dtype,
            remat=cfg.model.remat,
        )
        self._step = sharding.jit_train_step(
            lambda state, batch, frozen: step(state, batch),
            self.mesh,
            self.rules,
            state_shardings=state_shardings,
            batch_sharding=sharding.batch_sharding(
                self.mesh, self.rules, t.micro_batch_size, axis=1
            ),
        )
        self._score = Scorer(self.config, dtype=cfg.model.dtype, mesh=self.mesh, rules=self.rules)

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
        sums, steps, skipped, pending = {}, 0, 0, None
        total = math.ceil(n / t.batch_size)

        def add(metrics, step: int):  # counted, or skipped as non-finite
            nonlocal skipped
            metrics = jax.device_get(metrics)
            if not self.guard.counts(metrics, where=f"epoch {epoch}, step {step} of {total}"):
                skipped += 1
                return
            w = float(metrics["num_pairs"])
            for key in ("loss", "accuracy", "margin"):
                sums[key] = sums.get(key, 0.0) + w * float(metrics[key])
            sums["pairs"] = sums.get("pairs", 0.0) + w
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(metrics["grad_norm"])

        for start in tqdm(
            range(0, n, t.batch_size),
            desc=f"epoch {epoch} train",
            unit="step",
            disable=not self.progress,
            leave=False,
        ):
            batch = pair_batch(
                *self.train,
                order[start : start + t.batch_size],
                batch_size=t.batch_size,
                micro_batch_size=t.micro_batch_size,
                max_len=d.max_tokens,
                pad_id=self.pad_id,
            )
            self.state, metrics = self._step(self.state, batch, None)
            if pending is not None:  # fetch step N's metrics after step N+1 is dispatched
                add(pending, steps)
            pending, steps = metrics, steps + 1
        add(pending, steps)
        pairs, nan = max(sums.pop("pairs", 0.0), 1.0), float("nan")
        out = {f"train.{k}": v / pairs for k, v in sums.items() if k != "grad_norm"}
        return out | {
            "train.grad_norm": sums["grad_norm"] / (steps - skipped) if steps > skipped else nan,
            "train.steps": steps,
            "train.skipped_steps": skipped,  # non-finite: the state was left as it was
        }

    def run(self) -> list[dict]:
        """Trains the remaining epochs; returns every metrics record (iteration -1: before)."""
        if self.next_epoch == 0:
            self.log.write(
                {
                    "iteration": -1,
                    **self.evaluate(),
                    **{f"data.train_{k}": v for k, v in self.train_stats.items()},
                    **{f"data.eval_{k}": v for k, v in self.eval_stats.items()},
                }
            )
        epochs = self.cfg.train.epochs
        for epoch in tqdm(
            range(self.next_epoch, epochs),
            desc="reward model",
            unit="epoch",
            disable=not self.progress,
            initial=self.next_epoch,
            total=epochs,
        ):
            start = time.perf_counter()
            record = self._epoch(epoch)
            record["seconds.training"] = time.perf_counter() - start
            start = time.perf_counter()
            record |= self.evaluate()
            record["seconds.evaluation"] = time.perf_counter() - start
            record = {"iteration": epoch, **record}  # MetricsLog's step key: here the epoch
            self.log.write(record)  # before the checkpoint, as in the OPTune loop
            self.ckpt.save(
                epoch,
                state=self.state,
                host={"epoch": np.int32(epoch + 1)},
                meta={
                    "next_epoch": epoch + 1,
                    "skipped_in_a_row": self.guard.in_a_row,
                    "config": config_to_dict(self.cfg),
                },
            )
            self.next_epoch = epoch + 1
            nan = float("nan")  # every step of the epoch skipped: no training loss
            tqdm.write(
                f"epoch {epoch}: train loss {record.get('train.loss', nan):.4f} acc "
                f"{record.get('train.accuracy', nan):.3f}, held-out loss {record['eval.loss']:.4f} "
                f"acc {record['eval.accuracy']:.3f} ({record['seconds.training']:.0f}s)"
            )
        return self.log.read()

    def export(self) -> Path:
        params = jax.device_get(self.state.params)
        return replace_dir(
            self.out / "model",
            lambda path: export_reward_checkpoint(
                params, self.config, path, tokenizer=self.tokenizer
            ),
        )

    def close(self):
        self.log.close()
        self.ckpt.close()

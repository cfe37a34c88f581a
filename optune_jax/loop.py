"""The OPTune iteration end to end (Algorithm 1 of the OPTune paper; design §3-§4, §6): the wiring.

pairs (select -> sample -> reward -> assemble D_t, `pair_source`) -> reference logps (under the
policy `reference_policy` chooses, `reference`) -> epochs of the loss (`policy_trainer`, HyPO's
samples through `hypo`) -> evaluate (`evaluate`) -> checkpoint (`run.runner`). Each phase lives
in the module named after it; `components` builds what they share.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np

from losses import get_loss
from models import export_hf_checkpoint
from models.lora import merge
from optune_jax import divergence, prompts, reward_history, selection
from optune_jax.components import (
    adapter_shardings,
    build_layout,
    init_adapters,
    load_policy,
    lora_spec,
    policy_spec,
    policy_tokenizer,
    train_program,
)
from optune_jax.evaluate import Evaluator, mean_ci95
from optune_jax.generate import Generator
from optune_jax.hypo import OnlineSampleHook
from optune_jax.optimizer import build_optimizer, create_state, updates
from optune_jax.pair_source import make_source, pairs_from_file
from optune_jax.policy_trainer import PolicyTrainer
from optune_jax.reference import ReferenceLogps
from optune_jax.reference_policy import reference_for
from optune_jax.rewards.functions import make_reward
from optune_jax.run import distributed, eval_cache
from optune_jax.run.guard import NonFiniteGuard
from optune_jax.run.metrics_log import MetricsLog
from optune_jax.run.runner import Runner
from optune_jax.run.schema import RunConfig
from optune_jax.scoring import ResponseScorer

# Settings a resumed run may change; any other difference makes the checkpoint incompatible.
RESUMABLE_CHANGES = (
    "optune.iterations", "eval", "run.output_dir", "run.keep_checkpoints", "mesh", "distributed",
    "train.max_skipped_steps", "run.compilation_cache", "model.attention", "model.remat",
)
COUNTED = ("prompts_regenerated", "responses_generated", "tokens_generated")


def _one_line(r: dict) -> str:
    nan = float("nan")
    return (
        f"iter {r['iteration']}: regenerated {r['prompts_regenerated']} prompts "
        f"({r['seconds.generation']:.0f}s, {r.get('seconds.generation_compile', 0):.0f}s of it "
        f"compiling), reward new {r.get('reward_new', nan):.3f} "
        f"kept {r.get('reward_kept', nan):.3f}, {r['pairs']} pairs "
        f"({r['pairs_dropped_ties']} ties), "
        f"loss {r.get('train.loss', float('nan')):.4f} ({r['seconds.training']:.0f}s), "
        f"held-out reward {r['eval.reward']:.4f} (gain {r.get('eval.reward_gain', nan):+.3f} ± "
        f"{r.get('eval.reward_gain_ci95', nan):.3f}, 95 %), win score {r['eval.win_score']:.1f}"
        + (
            f", KL to π_0 {r['eval.kl_initial']:.3f}, NLL under π_0 {r['eval.nll_initial']:.2f}"
            if "eval.kl_initial" in r
            else ""
        )
    )


class OptuneRun(Runner):
    """One training run in `cfg.run.output_dir` (`run()` trains, `export()` writes the model)."""

    unit, desc, resumable = "iteration", "OPTune", RESUMABLE_CHANGES

    def __init__(self, cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
                 progress=True):
        # everything that can be wrong is checked before anything is written
        self.cfg = cfg
        from_file = pairs_from_file(cfg)
        tokenizer = policy_tokenizer(cfg.model)  # the data is read before the weights load
        self.train_prompts, self.eval_prompts = prompts.load_prompts(
            cfg, tokenizer, pair_files=from_file
        )
        self.ref_policy = reference_for(cfg, num_prompts=len(self.train_prompts.ids),
                                        pairs_from_file=from_file)
        self.layout = build_layout(cfg.mesh)
        reward_fn = make_reward(  # a reward model is laid out like the policy
            cfg.reward, prompt_column=cfg.data.prompt_column, dtype=cfg.model.dtype,
            layout=self.layout,
        )
        self.policy, params = load_policy(cfg, self.layout, tokenizer)
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
        t = cfg.train
        plan = build_optimizer(t, updates_per_iteration=updates(t, len(self.train_prompts.ids)),
                               iterations=cfg.optune.iterations)
        self.lora, self.frozen, trainable = lora_spec(cfg.lora), None, params
        if self.lora:  # adapters train; the base weights stay frozen (and are π_0)
            self.frozen = params
            trainable = jax.device_get(init_adapters(params, self.lora, cfg.run.seed))
            trainable = distributed.put(
                trainable, adapter_shardings(trainable, self.policy.config, self.lora, self.layout)
            )
        self.initial_params = None  # π_0, for reference: initial and the drift metrics
        if self.ref_policy.needs_initial or cfg.eval.drift:  # on the host unless the base
            self.initial_params = self.frozen if self.lora else distributed.get(params)
        self.state, state_shardings = create_state(trainable, plan.transform,
                                                            self.layout.mesh)
        self.initial_eval = np.zeros((len(self.eval_prompts.ids),), np.float32)
        self.totals = dict(
            prompts_regenerated=0, responses_generated=0, tokens_generated=0,
            generation_seconds=0.0, generation_compile_seconds=0.0,
        )
        self.guard = NonFiniteGuard(t.max_skipped_steps)
        # the phases
        prompt_len = cfg.data.max_prompt_tokens
        self.generator = Generator(cfg.sampling, self.policy, self.layout, cfg.model.dtype,
                                   prompt_len, progress)
        self.scorer = ResponseScorer(cfg.reward.name, tokenizer, reward_fn, cfg.data.prompt_column)
        self.source = make_source(cfg, self.policy, self.train_prompts, self.generator,
                                  self.scorer)
        self.ref_logps = ReferenceLogps(
            policy_spec(self.policy.config, cfg.model, cfg.loss),
            prompt_len=prompt_len,
            layout=self.layout,
            param_shardings=param_shardings,
            rows=2 * t.micro_batch_size,
            pack=t.pack,
        )
        self.evaluator = Evaluator(
            cfg.eval,
            cfg.sampling,
            cfg.run.seed,
            prompt_len,
            cfg.data.prompt_column,
            self.generator,
            self.scorer,
            self.ref_logps,
            self.eval_prompts.ids,
            self.eval_prompts.rows,
            self.eval_prompts.prefix,
            self.initial_params,
            self.policy.pad_id,
        )
        self._open(steps=cfg.optune.iterations, resume=resume, overwrite=overwrite,
                   progress=progress)
        # per-prompt rewards of each iteration (none for pairs from a file): written before the
        # checkpoint like metrics.jsonl, and trimmed to the restored checkpoint the same way
        self.history = None if from_file else MetricsLog(
            self.out, resume_after=self.next_step - 1, name=reward_history.FILE, tensorboard=False
        )
        step, batch_sharding = train_program(
            cfg, self.policy.config, self.layout, optimizer=plan.transform, lora=self.lora,
            state_shardings=state_shardings, frozen_shardings=param_shardings,
        )
        self.trainer = PolicyTrainer(
            t, seed=cfg.run.seed, step=step, batch_sharding=batch_sharding, plan=plan,
            state_shardings=state_shardings, prompt_len=prompt_len, model=self.policy.config,
            progress=progress,
        )
        self._merge = jax.jit(functools.partial(merge, spec=self.lora)) if self.lora else None

    def policy_params(self, state=None):
        """The policy's full weights: with adapters, base + the mean of their updates."""
        params = (self.state if state is None else state).params
        return params if self.lora is None else self._merge(self.frozen, params)

    # ------------------------------------------------------------------ Runner's part
    def _host_state(self) -> dict:
        p = self.source.pool
        return dict(
            tokens=p.tokens_P2Y,
            lengths=p.lengths_P2,
            rewards=p.rewards_P2,
            iteration=p.iteration_P,
            initial_eval=self.initial_eval,
            behavior_ref=self.ref_policy.kept_P2,  # (the key older runs wrote)
        )

    def _restored(self, host: dict, meta: dict) -> None:
        self.source.pool = selection.PromptPool(
            *(np.asarray(host[k]) for k in ("tokens", "lengths", "rewards", "iteration")),
            self.policy.pad_id,
        )
        self.initial_eval = np.asarray(host["initial_eval"])
        self.ref_policy.kept_P2 = np.array(host["behavior_ref"])
        self.totals = meta["totals"]

    def _meta(self) -> dict:
        return {"totals": self.totals}

    def _before(self) -> dict:
        start, cache = time.perf_counter(), self.cfg.eval.initial_cache
        params, found = self.policy_params(), None
        if cache:  # the same evaluation of π_0 as an earlier run's (design §9)
            digest = eval_cache.key(self.cfg, params, self.eval_prompts.ids, self.eval_prompts.rows)
            found = eval_cache.load(cache, digest)
        if found is None:
            self.initial_eval, record = self.evaluator(params, initial=True)
            if cache:
                eval_cache.save(cache, digest, self.initial_eval, record)
        else:
            self.initial_eval, record = found
        return {
            **record,
            "eval.win_score": 50.0,
            "eval.cached": found is not None,
            "seconds.evaluation": time.perf_counter() - start,
            **{f"data.train_{k}": v for k, v in self.train_prompts.stats.items()},
            **{f"data.eval_{k}": v for k, v in self.eval_prompts.stats.items()},
        }

    def _step(self, t: int) -> dict:
        """One OPTune iteration: pairs, reference logps, training, evaluation."""
        cfg, clock = self.cfg, time.perf_counter
        timers = {"generation": 0.0, "generation_compile": 0.0, "reward": 0.0}
        pi_t = self.policy_params()
        batch, prompt_idx, record = self.source.pairs(t, pi_t, timers)
        self._count(record, timers["generation"], timers["generation_compile"])
        # 7a. reference logps of the pairs (design §3); a fixed reference scores each pair once
        start = clock()
        new_Q = self.source.pool.iteration_P[prompt_idx] == t
        ref_Q2 = self.ref_policy.logps(self.ref_logps, batch, prompt_idx, new_Q, pi_t=pi_t,
                                       initial=self.initial_params)
        batch = batch.replace(ref_logps=ref_Q2)
        timers["reference"] = clock() - start
        # 7b. epochs of the loss over D_t (HyPO draws its online samples before its steps)
        start = clock()
        hook = None
        if get_loss(cfg.loss.name).needs_samples:  # its KL term is to π_0 (make_reference)
            t_cfg = cfg.train
            hook = OnlineSampleHook(
                cfg.hypo, cfg.run.seed, cfg.data.max_prompt_tokens,
                t_cfg.batch_size // t_cfg.micro_batch_size, self.generator, self.ref_logps,
                self.train_prompts, self.policy_params, self.initial_params, prompt_idx, t,
            )
        self.state, train_metrics = self.trainer.train(
            self.state, batch, t, guard=self.guard, frozen=self.frozen, before_step=hook
        )
        online = hook.counts if hook else {k: 0 for k in (*COUNTED, "seconds", "compile_seconds")}
        timers["training"] = clock() - start - online["seconds"]
        timers["generation"] += online["seconds"]
        timers["generation_compile"] += online["compile_seconds"]
        for key in COUNTED:
            record[key] += online[key]
        self._count(online, online["seconds"], online["compile_seconds"])
        # evaluate π_{t+1} on held-out prompts (design §6)
        start = clock()
        eval_rewards, eval_record = self.evaluator(self.policy_params())
        timers["evaluation"] = clock() - start
        if self.history is not None:  # D_t's rewards per prompt, before the metrics line
            self.history.write(reward_history.record(self.source.pool, t))
        record = {
            **record,
            **{f"seconds.{k}": v for k, v in timers.items()},
            **{f"train.{k}": v for k, v in train_metrics.items()},
            **eval_record,
            "eval.win_score": Evaluator.win_score(eval_rewards, self.initial_eval),
            # the gain over π_0, paired per prompt: how far one evaluation can be trusted
            "eval.reward_gain": float(np.mean(eval_rewards - self.initial_eval, dtype=np.float64)),
            "eval.reward_gain_ci95": mean_ci95(eval_rewards - self.initial_eval),
            **{f"total.{k}": v for k, v in self.totals.items()},
        }
        why = divergence.reasons(record, self._initial_record(), cfg.eval)
        if why:
            record["diverged"] = why
            self._say(f"warning: iteration {t} diverged: {'; '.join(why)}")
        return record

    def _initial_record(self) -> dict:
        """The evaluation of π_0 (metrics.jsonl's iteration -1)."""
        return next(r for r in self.log.read() if r["iteration"] == -1)

    def _count(self, counts: dict, seconds: float, compile_seconds: float) -> None:
        for key in COUNTED:
            self.totals[key] += counts[key]
        self.totals["generation_seconds"] += seconds
        # (a checkpoint of an older run has no compile total)
        self.totals["generation_compile_seconds"] = (
            self.totals.get("generation_compile_seconds", 0.0) + compile_seconds
        )

    def _line(self, record: dict) -> str:
        return _one_line(record)

    def _export_params(self):
        return self.policy_params()

    def _write_model(self, params, path) -> None:
        export_hf_checkpoint(params, self.policy.config, path, tokenizer=self.policy.tokenizer)

    def close(self) -> None:
        if getattr(self, "history", None) is not None:  # (not yet there if the start failed)
            self.history.close()
            self.history = None
        super().close()

    def describe_data(self) -> str:
        return prompts.describe(self.train_prompts, self.eval_prompts, self.cfg.data)

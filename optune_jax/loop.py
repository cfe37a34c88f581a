"""The OPTune iteration end to end (Algorithm 1 of the OPTune paper; SPEC §3-§4, §6).

select -> sample 2 responses -> reward -> assemble D_t -> reference logps -> epochs of the
loss -> evaluate -> checkpoint. Everything with side effects (files, progress bars, logs)
lives here; the pieces it drives are pure.
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

from losses import get_loss
from models import (
    SMOLLM2,
    ModelConfig,
    export_hf_checkpoint,
    init_params,
    load_pretrained,
    load_tokenizer,
)
from models.lora import LoraSpec, init_lora, lora_logical_axes, merge
from optune_jax import data as data_lib
from optune_jax import distributed, drift, selection, sharding
from optune_jax import rewards as rewards_lib
from optune_jax.checkpoint import Checkpoints
from optune_jax.config import RandomModel, RunConfig, config_to_dict
from optune_jax.errors import RunError
from optune_jax.metrics_log import MetricsLog
from optune_jax.pairs import batches, layout, pair_arrays
from optune_jax.run_dir import prepare_run_dir, replace_dir
from optune_jax.train_step import (
    LossChoice,
    NonFiniteGuard,
    PolicySpec,
    make_optimizer,
    response_logps,
    train_step,
)
from sampling import SamplingOptions, common_prefix, sample_prompts

# Settings a resumed run may change; any other difference makes the checkpoint incompatible.
RESUMABLE_CHANGES = (
    "optune.iterations", "eval", "run.output_dir", "run.keep_checkpoints", "mesh", "distributed",
    "train.max_skipped_steps",
)
EVAL_SEED_OFFSET = 1_000_003  # held-out draws use their own stream, the same every iteration
KL_METRICS = ("kl", "kl_surrogate")  # HyPO metrics averaged over sampled prompts


@dataclasses.dataclass
class Policy:
    config: ModelConfig
    tokenizer: object
    eos_ids: tuple[int, ...]
    pad_id: int


def random_architecture(r: RandomModel, tokenizer=None) -> ModelConfig:
    """The architecture `model.random` describes; vocabulary and special ids from `tokenizer`
    (None: `r.vocab_size` and ModelConfig's default ids, enough for shapes)."""
    special = {}
    if tokenizer is not None:
        special = dict(
            eos_token_id=(tokenizer.eos_token_id,),
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return ModelConfig(
        vocab_size=r.vocab_size or len(tokenizer),
        hidden_size=r.hidden_size,
        intermediate_size=r.intermediate_size,
        num_hidden_layers=r.num_hidden_layers,
        num_attention_heads=r.num_attention_heads,
        num_key_value_heads=r.num_key_value_heads,
        head_dim=r.head_dim,
        sliding_window=r.sliding_window,
        tie_word_embeddings=r.tie_word_embeddings,
        model_type="mistral",
        **special,
    )


def load_policy(cfg: RunConfig, mesh=None, rules=sharding.DEFAULT_RULES):
    """(Policy, initial params) from the config: a pretrained checkpoint or a random init.

    With a `mesh`, the parameters are created in (or copied straight into) their shards.
    """
    model = cfg.model
    tok_source = model.tokenizer or (SMOLLM2 if model.checkpoint == "random" else model.checkpoint)
    tokenizer = load_tokenizer(tok_source)
    if model.checkpoint == "random":
        config = random_architecture(model.random, tokenizer)
        key = jax.random.key(cfg.run.seed)
        if mesh is not None:
            params = sharding.init_sharded_params(
                config, key, mesh, rules, param_dtype=model.param_dtype
            )
        else:
            params = init_params(config, key, param_dtype=model.param_dtype)
    else:
        config, params = load_pretrained(model.checkpoint, dtype=model.param_dtype)
        if mesh is not None:
            params = distributed.put(params, sharding.param_shardings(config, mesh, rules))
        else:
            params = jax.tree.map(jnp.asarray, params)
    eos = tuple(dict.fromkeys([*config.eos_token_id, tokenizer.eos_token_id]))
    return Policy(config, tokenizer, eos, int(tokenizer.pad_token_id)), params


def _one_line(r: dict) -> str:
    nan = float("nan")
    return (
        f"iter {r['iteration']}: regenerated {r['prompts_regenerated']} prompts "
        f"({r['seconds.generation']:.0f}s), reward new {r.get('reward_new', nan):.3f} "
        f"kept {r.get('reward_kept', nan):.3f}, {r['pairs']} pairs "
        f"({r['pairs_dropped_ties']} ties), "
        f"loss {r.get('train.loss', float('nan')):.4f} ({r['seconds.training']:.0f}s), "
        f"held-out reward {r['eval.reward']:.4f}, win score {r['eval.win_score']:.1f}"
        + (
            f", KL to π_0 {r['eval.kl_initial']:.3f}, NLL under π_0 {r['eval.nll_initial']:.2f}"
            if "eval.kl_initial" in r
            else ""
        )
    )


class OptuneRun:
    """One training run in `cfg.run.output_dir` (see `run` for the entry point)."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
    ):
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.progress = progress
        # everything that can be wrong is checked before anything is written
        spec = get_loss(cfg.loss.name)
        rewarded = not cfg.data.offline_files  # pairs from a file carry no rewards
        allowed = {  # which losses each mode can feed
            "optune": lambda s: not s.needs_samples,
            "offline": lambda s: not s.needs_samples and (rewarded or not s.needs_rewards),
            "hypo": lambda s: s.needs_samples,
        }[cfg.run.mode]
        if not allowed(spec):
            from losses import LOSSES

            ok = [name for name, s in LOSSES.items() if allowed(s)]
            raise RunError(
                f"loss.name={cfg.loss.name} does not fit run.mode={cfg.run.mode}; "
                f"allowed: {', '.join(ok)}"
            )
        m = cfg.mesh
        self.mesh = sharding.make_mesh((m.data, m.fsdp, m.tensor))
        self.rules = sharding.make_rules(m.rules)
        self.reward_fn = rewards_lib.make_reward(  # a reward model is laid out like the policy
            cfg.reward,
            prompt_column=cfg.data.prompt_column,
            dtype=cfg.model.dtype,
            mesh=self.mesh,
            rules=self.rules,
        )
        self.policy, params = load_policy(cfg, self.mesh, self.rules)
        self.param_shardings = jax.tree.map(lambda x: x.sharding, params)
        self._load_prompts()
        # fixed per prompt set, so a prompt's samples do not depend on the prompts beside it
        share = common_prefix if cfg.sampling.share_prefix else lambda _: ()
        self.train_prefix, self.eval_prefix = share(self.train_prompts), share(self.eval_prompts)
        if distributed.is_primary():  # one process checks and writes the shared directory
            prepare_run_dir(
                self.out,
                config_to_dict(cfg),
                resume=resume,
                overwrite=overwrite,
                resumable=RESUMABLE_CHANGES,
            )
        distributed.barrier("output dir ready")
        self.loss = LossChoice.from_values(cfg.loss.name, dataclasses.asdict(cfg.loss))
        self.spec = PolicySpec(
            self.policy.config, cfg.model.dtype, cfg.model.remat, cfg.loss.average_logps
        )
        t = cfg.train
        steps_per_iter = cfg.train.epochs * math.ceil(len(self.train_prompts) / t.batch_size)
        self.optimizer = make_optimizer(
            name=t.optimizer,
            learning_rate=t.learning_rate,
            total_steps=steps_per_iter * cfg.optune.iterations,
            warmup_ratio=t.warmup_ratio,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
        )
        self.lora, self.frozen, trainable = None, None, params
        if cfg.lora.rank > 0:  # adapters train; the base weights stay frozen (and are π_0)
            lc = cfg.lora
            self.lora = LoraSpec(lc.rank, lc.alpha, tuple(lc.targets), lc.num_adapters)
            self.frozen = params
            trainable = init_lora(params, self.lora, jax.random.key(cfg.run.seed + 1))
            specs = lora_logical_axes(self.policy.config, self.lora)
            trainable = distributed.put(
                jax.device_get(trainable),
                sharding.tree_shardings(trainable, specs, self.mesh, self.rules),
            )
        self.initial_params = None  # π_0, for reference: initial and the drift metrics
        if cfg.optune.reference == "initial" or cfg.eval.drift:  # on the host unless the base
            self.initial_params = self.frozen if self.lora else distributed.get(params)
        self.state, self.state_shardings = sharding.create_state(
            trainable, self.optimizer, self.mesh
        )
        self.pool = selection.PromptPool.empty(
            len(self.train_prompts), cfg.sampling.max_new_tokens, pad_id=self.policy.pad_id
        )
        self.initial_eval = np.zeros((len(self.eval_prompts),), np.float32)
        self.totals = dict(
            prompts_regenerated=0, responses_generated=0, tokens_generated=0, generation_seconds=0.0
        )
        self.next_iteration = 0
        self.guard = NonFiniteGuard(cfg.train.max_skipped_steps)
        self.ckpt = Checkpoints(self.out / "checkpoints", keep=cfg.run.keep_checkpoints)
        if resume:
            self._restore()
        self.log = MetricsLog(self.out, resume_after=self.next_iteration - 1)
        self._compile()

    # ------------------------------------------------------------------------ set-up
    def _load_prompts(self):
        d = self.cfg.data
        if self.cfg.run.mode == "optune" or not d.offline_files:
            rows = data_lib.load_prompt_rows(list(d.train_files), d.prompt_column)
        else:
            columns = (d.prompt_column, d.chosen_column, d.rejected_column)
            rows = data_lib.load_pair_rows(list(d.offline_files), columns)
        if d.eval_files:
            eval_rows = data_lib.load_prompt_rows(list(d.eval_files), d.prompt_column)
        else:
            rows, eval_rows = data_lib.split_eval(rows, d.eval_fraction, self.cfg.run.seed)
        rows = rows[: d.num_train_prompts] if d.num_train_prompts else rows
        eval_rows = eval_rows[: d.num_eval_prompts] if d.num_eval_prompts else eval_rows
        enc = functools.partial(
            data_lib.encode_prompts,
            tokenizer=self.policy.tokenizer,
            column=d.prompt_column,
            max_tokens=d.max_prompt_tokens,
            overlong=d.overlong,
            system_prompt=d.system_prompt,
        )
        self.train_prompts, self.train_rows, self.train_stats = enc(rows)
        self.eval_prompts, self.eval_rows, self.eval_stats = enc(eval_rows)
        self.offline_arrays = None
        if self.cfg.run.mode != "optune" and d.offline_files:  # the fixed pairs, laid out once
            s = self.cfg.sampling
            enc = functools.partial(
                data_lib.encode_responses,
                tokenizer=self.policy.tokenizer,
                max_tokens=s.max_new_tokens,
                eos_id=self.policy.eos_ids[0],
                pad_id=self.policy.pad_id,
            )
            sides = [
                enc([r[c] for r in self.train_rows]) for c in (d.chosen_column, d.rejected_column)
            ]
            tokens = np.stack([t for t, _ in sides], axis=1)
            lengths = np.stack([n for _, n in sides], axis=1)
            self.offline_arrays = dict(
                layout(
                    self.train_prompts,
                    tokens,
                    lengths,
                    prompt_len=d.max_prompt_tokens,
                    pad_id=self.policy.pad_id,
                ),
                rewards_K2=np.tile(np.float32([1.0, 0.0]), (len(tokens), 1)),
                pair_mask_K=np.ones((len(tokens),), bool),
                prompt_idx_K=np.arange(len(tokens), dtype=np.int32),
            )
        for name, prompts in (("training", self.train_prompts), ("held-out", self.eval_prompts)):
            if not prompts:
                raise RunError(
                    f"no {name} prompts left (files {list(d.train_files)}, "
                    f"max_prompt_tokens={d.max_prompt_tokens}, overlong={d.overlong})"
                )

    def _compile(self):
        t, mesh, rules = self.cfg.train, self.mesh, self.rules
        self._batch_sharding = sharding.batch_sharding(mesh, rules, t.micro_batch_size, axis=1)
        self._step = sharding.jit_train_step(
            functools.partial(
                train_step,
                optimizer=self.optimizer,
                policy=self.spec,
                loss=self.loss,
                prompt_len=self.cfg.data.max_prompt_tokens,
                lora=self.lora,
            ),
            mesh,
            rules,
            state_shardings=self.state_shardings,
            batch_sharding=self._batch_sharding,
            frozen_shardings=self.param_shardings if self.lora else None,
        )
        self._merge = jax.jit(functools.partial(merge, spec=self.lora)) if self.lora else None
        # shardings follow the (sharded) parameters; logps come back to every host
        def logps_fn(spec):
            fn = functools.partial(
                response_logps, policy=spec, prompt_len=self.cfg.data.max_prompt_tokens
            )
            return jax.jit(
                sharding.with_rules(fn, mesh, rules), out_shardings=sharding.replicated(mesh)
            )

        self._logps = logps_fn(self.spec)
        # the drift metrics need sums over tokens, whatever the loss averages
        summed = dataclasses.replace(self.spec, average_logps=False)
        self._sum_logps = self._logps if summed == self.spec else logps_fn(summed)
        self._ref_rows = 2 * t.micro_batch_size
        self._rows_sharding = sharding.batch_sharding(mesh, rules, self._ref_rows)

    def policy_params(self):
        """The policy's full weights: with adapters, base + the mean of their updates."""
        if self.lora is None:
            return self.state.params
        return self._merge(self.frozen, self.state.params)

    def _host_state(self):
        p = self.pool
        return dict(
            tokens=p.tokens_P2L,
            lengths=p.lengths_P2,
            rewards=p.rewards_P2,
            iteration=p.iteration_P,
            initial_eval=self.initial_eval,
        )

    def _restore(self):
        """Continues from the newest good checkpoint (damaged ones are set aside, with a line
        on stderr saying which and why); without one the run starts afresh."""
        found = self.ckpt.restore_newest(state_like=self.state, host_like=self._host_state())
        distributed.barrier("checkpoints verified")
        if found.note and distributed.is_primary():
            tqdm.write(f"warning: {found.note}", file=sys.stderr)
        if found.step is None:
            return
        self.state, host, meta = found.state, found.host, found.meta
        self.guard.in_a_row = meta.get("skipped_in_a_row", 0)
        self.pool = selection.PromptPool(
            np.asarray(host["tokens"]),
            np.asarray(host["lengths"]),
            np.asarray(host["rewards"]),
            np.asarray(host["iteration"]),
            self.policy.pad_id,
        )
        self.initial_eval = np.asarray(host["initial_eval"])
        self.totals = meta["totals"]
        self.next_iteration = meta["next_iteration"]

    # ------------------------------------------------------------------------ phases
    def _sample(
        self,
        params,
        prompts,
        ids,
        *,
        seed,
        iteration,
        num_samples,
        max_new,
        batch,
        desc,
        prefix,
        **override,
    ):
        """Samples with the `sampling.*` settings; `override` replaces SamplingOptions fields."""
        s = self.cfg.sampling
        opts = SamplingOptions(
            max_new_tokens=max_new,
            eos_ids=self.policy.eos_ids,
            pad_id=self.policy.pad_id,
            num_samples=num_samples,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
        )
        opts = dataclasses.replace(opts, **override)
        put = lambda x: distributed.put(x, sharding.batch_sharding(self.mesh, self.rules, len(x)))
        with tqdm(
            total=len(prompts), desc=desc, unit="prompt", disable=not self.progress, leave=False
        ) as bar, sharding.rules_context(self.mesh, self.rules):
            return sample_prompts(
                params,
                prompts,
                ids,
                config=self.policy.config,
                opts=opts,
                seed=seed,
                iteration=iteration,
                batch_size=batch,
                max_prompt_len=self.cfg.data.max_prompt_tokens,
                dtype=self.cfg.model.dtype,
                shared_prefix=prefix,
                pack=s.pack_prompts,
                on_batch=bar.update,
                device_put=put,
                device_get=distributed.get,
            )

    def _texts(self, tokens_NL, lengths_N):
        return self.policy.tokenizer.batch_decode(
            [t[:n] for t, n in zip(tokens_NL, lengths_N, strict=True)], skip_special_tokens=True
        )

    def _score(self, rows, tokens_NSL, lengths_NS):
        n, s = lengths_NS.shape
        texts = self._texts(tokens_NSL.reshape(n * s, -1), lengths_NS.reshape(-1))
        rows = [r for r in rows for _ in range(s)]
        scores = rewards_lib.score(self.cfg.reward.name, rows, texts, fn=self.reward_fn)
        return scores.reshape(n, s)

    def _evaluate(self, params, *, initial: bool = False) -> tuple[np.ndarray, dict]:
        """Held-out rewards [N] and the evaluation's record (SPEC §6, drift from π_0).

        Rewards, length and EOS rate come from one sample per prompt with the `sampling.*`
        settings. With `eval.drift`: KL(π_t‖π_0) per token on exact samples of π_t (these same
        samples when the settings are exact, else a draw at temperature 1 without truncation;
        0 by definition for π_0 itself), and π_t's greedy answers: their NLL under π_0, EOS
        rate and length, and the first `eval.examples` of them as text.
        """
        e, s = self.cfg.eval, self.cfg.sampling
        draw = functools.partial(
            self._sample,
            params,
            self.eval_prompts,
            np.arange(len(self.eval_prompts)),
            seed=self.cfg.run.seed + EVAL_SEED_OFFSET,
            iteration=0,
            num_samples=1,
            max_new=e.max_new_tokens or s.max_new_tokens,
            batch=e.batch_size or s.batch_size,
            prefix=self.eval_prefix,
        )
        gen = draw(desc="evaluate")
        rewards = self._score(self.eval_rows, gen.tokens, gen.lengths)[:, 0]
        record = {
            "eval.reward": float(np.mean(rewards)),
            "eval.eos_rate": float(np.mean(gen.finished)),
            "eval.response_tokens": float(np.mean(gen.lengths)),
        }
        if not e.drift:
            return rewards, record
        exact = s.temperature == 1.0 and s.top_p == 1.0 and not s.top_k
        samples = gen
        if not (exact or initial):  # an unbiased KL estimate needs untruncated samples of π_t
            samples = draw(desc="evaluate: KL samples", iteration=1, top_p=1.0, top_k=0,
                           temperature=1.0)
        greedy = draw(desc="evaluate: greedy", greedy=True)
        rows = layout(  # samples and greedy answers side by side: one π_0 pass for both
            self.eval_prompts,
            np.concatenate([samples.tokens, greedy.tokens], axis=1),
            np.concatenate([samples.lengths, greedy.lengths], axis=1),
            prompt_len=self.cfg.data.max_prompt_tokens,
            pad_id=self.policy.pad_id,
        )
        logp0 = self._reference_logps(self.initial_params, *rows.values(), fn=self._sum_logps)
        logp_t = samples.logps.sum(-1)[:, 0]  # the sampler's logps: π_t's own when exact
        kl = 0.0 if initial else drift.kl_per_token(logp_t, logp0[:, 0], samples.lengths[:, 0])
        k = min(e.examples, len(self.eval_prompts))
        answers = self._texts(greedy.tokens[:k, 0], greedy.lengths[:k, 0])
        column = self.cfg.data.prompt_column
        record.update({
            "eval.kl_initial": kl,
            "eval.nll_initial": drift.nll_per_token(logp0[:, 1], greedy.lengths[:, 0]),
            "eval.greedy_eos_rate": float(np.mean(greedy.finished)),
            "eval.greedy_tokens": float(np.mean(greedy.lengths)),
            "eval.greedy_rep4": drift.seq_rep_n(
                [t[:n] for t, n in zip(greedy.tokens[:, 0], greedy.lengths[:, 0], strict=True)]
            ),
            "eval.examples": [
                {"prompt": r[column], "answer": a}
                for r, a in zip(self.eval_rows[:k], answers, strict=True)
            ],
        })
        return rewards, record

    def _reference_logps(self, params, tokens_NST, attn_NST, resp_NST, *, fn=None):
        """Sequence logps [N, S] of every row, in fixed-size chunks (one compiled program).

        `fn`: the jitted logp function (default: the loss's, per-token mean or sum).
        """
        fn = fn or self._logps
        if not isinstance(jax.tree.leaves(params)[0], jax.Array):  # π_0 from the host
            params = distributed.put(params, self.param_shardings)
        n, s = tokens_NST.shape[:2]
        flat = [x.reshape(n * s, x.shape[-1]) for x in (tokens_NST, attn_NST, resp_NST)]
        rows = self._ref_rows
        out = np.zeros((n * s,), np.float32)
        for start in range(0, n * s, rows):
            chunk = [x[start : start + rows] for x in flat]
            m = len(chunk[0])
            if m < rows:
                chunk = [np.concatenate([x, np.repeat(x[:1], rows - m, 0)]) for x in chunk]
            chunk = distributed.put(chunk, self._rows_sharding)
            out[start : start + m] = np.asarray(fn(params, *chunk))[:m]
        return out.reshape(n, s)

    def _collect(self, t: int, pi_t, timers, *, regenerate: bool) -> tuple[dict, dict]:
        """Steps 1-6 of SPEC §4: select, sample from π_t, reward, assemble D_t.

        `regenerate=False` keeps every pair (offline DPO: D_0 from π_0, never refreshed).
        """
        cfg, clock = self.cfg, time.perf_counter
        rng = np.random.default_rng([cfg.run.seed, t])
        # 1. select (SPEC §4 step 1; everything at t = 0)
        method = "lowest" if cfg.optune.selection == "reward" else "random"
        idx = np.zeros((0,), np.int64)
        if regenerate:
            idx = selection.select(
                self.pool, cfg.optune.rho, method=method, key=cfg.optune.rank_key, rng=rng
            )
        # 2. sample two responses per selected prompt from π_t
        start = clock()
        gen = self._sample(
            pi_t,
            [self.train_prompts[i] for i in idx],
            idx,
            seed=cfg.run.seed,
            iteration=t,
            num_samples=2,
            max_new=cfg.sampling.max_new_tokens,
            batch=cfg.sampling.batch_size,
            desc=f"iter {t} generate",
            prefix=self.train_prefix,
        )
        timers["generation"] = clock() - start
        # 3. reward the new responses
        start = clock()
        new_rewards = np.zeros((0, 2), np.float32)
        if len(idx):
            new_rewards = self._score([self.train_rows[i] for i in idx], gen.tokens, gen.lengths)
            # TRL's missing_eos_penalty: a response cut at the budget loses this much reward
            new_rewards -= cfg.reward.missing_eos_penalty * ~gen.finished
        timers["reward"] = clock() - start
        # 4-6. assemble D_t, choose winners, drop ties; the pool's rewards are the next ranking
        self.pool = selection.update_pool(self.pool, idx, gen.tokens, gen.lengths, new_rewards, t)
        pairs = selection.build_pairs(self.pool, t)
        arrays = pair_arrays(
            self.train_prompts,
            pairs,
            prompt_len=cfg.data.max_prompt_tokens,
            pad_id=self.policy.pad_id,
            eos_ids=self.policy.eos_ids,
            drop_truncated=cfg.sampling.truncated == "drop",
        )
        self._count_generation(len(idx), 2 * len(idx), gen.tokens_generated, timers["generation"])
        record = {
            "prompts_regenerated": len(idx),
            "responses_generated": 2 * len(idx),
            "tokens_generated": gen.tokens_generated,
            "pairs": len(pairs.prompt_idx_K),
            "pairs_dropped_ties": pairs.num_ties,
            "pairs_dropped_truncated": int(np.sum(~arrays["pair_mask_K"])),
            "reward_new": pairs.mean_reward_new,
            "reward_kept": pairs.mean_reward_kept,
            "responses_finished": float(np.mean(gen.finished)) if len(idx) else float("nan"),
        }
        return arrays, record

    def _count_generation(self, prompts: int, responses: int, tokens: int, seconds: float):
        self.totals["prompts_regenerated"] += prompts
        self.totals["responses_generated"] += responses
        self.totals["tokens_generated"] += tokens
        self.totals["generation_seconds"] += seconds

    def iteration(self, t: int) -> dict:
        cfg, timers = self.cfg, {"generation": 0.0, "reward": 0.0}
        clock = time.perf_counter
        pi_t = self.policy_params()
        if self.offline_arrays is not None:  # pairs from a file: nothing is generated
            arrays = dict(self.offline_arrays)
            record = {
                "prompts_regenerated": 0,
                "responses_generated": 0,
                "tokens_generated": 0,
                "pairs": len(arrays["pair_mask_K"]),
                "pairs_dropped_ties": 0,
            }
        else:  # offline / hypo without a file: D_0 from π_0, then fixed
            fresh = cfg.run.mode == "optune" or t == 0
            arrays, record = self._collect(t, pi_t, timers, regenerate=fresh)
        # 7a. reference logps of every pair, new and kept, in one pass (SPEC §3)
        start = clock()
        ref_params = self.initial_params if cfg.optune.reference == "initial" else pi_t
        arrays["ref_logps_K2"] = self._reference_logps(
            ref_params, arrays["tokens_K2T"], arrays["attn_K2T"], arrays["resp_K2T"]
        )
        timers["reference"] = clock() - start
        # 7b. epochs of the loss over D_t (HyPO draws its online samples inside)
        start = clock()
        if ref_params is self.state.params and get_loss(cfg.loss.name).needs_samples:
            # the train step donates the state; HyPO's samples need π_t during training, so it
            # waits on the host (use LoRA to keep a 7B reference on the device for free)
            ref_params = distributed.get(ref_params)
        train_metrics, online = self._train(arrays, t, ref_params)
        timers["training"] = clock() - start - online["seconds"]
        timers["generation"] += online["seconds"]
        for key in ("prompts_regenerated", "responses_generated", "tokens_generated"):
            record[key] += online[key]
        # evaluate π_{t+1} on held-out prompts (SPEC §6)
        start = clock()
        eval_rewards, eval_record = self._evaluate(self.policy_params())
        timers["evaluation"] = clock() - start
        wins = int(np.sum(eval_rewards > self.initial_eval))
        losses_ = int(np.sum(eval_rewards < self.initial_eval))
        return {
            "iteration": t,
            **record,
            **{f"seconds.{k}": v for k, v in timers.items()},
            **{f"train.{k}": v for k, v in train_metrics.items()},
            **eval_record,
            "eval.win_score": 50.0 + 100.0 * (wins - losses_) / len(eval_rewards),
            **{f"total.{k}": v for k, v in self.totals.items()},
        }

    def _online_samples(self, prompt_idx, ref_params, t: int, step: int) -> tuple[dict, int]:
        """HyPO's k samples per prompt of a batch from the current policy (SPEC §5)."""
        cfg = self.cfg
        k = cfg.hypo.samples_per_prompt
        gen = self._sample(
            self.policy_params(),
            [self.train_prompts[i] for i in prompt_idx],
            # a fresh draw per step: ids offset by the step keep draws independent
            prompt_idx + step * len(self.train_prompts),
            seed=cfg.run.seed,
            iteration=t,
            num_samples=k,
            max_new=cfg.sampling.max_new_tokens,
            batch=cfg.sampling.batch_size,
            desc=f"iter {t} online samples",
            prefix=self.train_prefix,
        )
        rows = layout(
            [self.train_prompts[i] for i in prompt_idx],
            gen.tokens,
            gen.lengths,
            prompt_len=cfg.data.max_prompt_tokens,
            pad_id=self.policy.pad_id,
            prefix="sample_",
        )
        ref = self._reference_logps(ref_params, *rows.values())
        a = cfg.train.batch_size // cfg.train.micro_batch_size
        shaped = {
            n.replace("_NST", "_AMKT"): x.reshape(a, -1, *x.shape[1:]) for n, x in rows.items()
        }
        shaped["sample_ref_logps_AMK"] = ref.reshape(a, -1, k)
        return shaped, gen.tokens_generated

    def _train(self, arrays, t: int, ref_params) -> tuple[dict, dict]:
        cfg = self.cfg.train
        hypo = get_loss(self.cfg.loss.name).needs_samples
        k = len(arrays["pair_mask_K"])
        sums: dict[str, float] = {}
        online = dict(prompts_regenerated=0, responses_generated=0, tokens_generated=0, seconds=0.0)
        steps, first, skipped = 0, None, 0
        total = cfg.epochs * math.ceil(k / cfg.batch_size)

        def fetch(metrics, step: int) -> None:  # counted, or skipped as non-finite
            nonlocal skipped
            metrics = jax.device_get(metrics)
            if self.guard.counts(metrics, where=f"iteration {t}, step {step} of {total}"):
                self._add(sums, {key: v for key, v in metrics.items() if key != "skipped"})
            else:
                skipped += 1

        with tqdm(
            total=total,
            desc=f"iter {t} train",
            unit="step",
            disable=not self.progress,
            leave=False,
        ) as bar:
            pending = None
            for epoch in range(cfg.epochs):
                order = np.random.default_rng([self.cfg.run.seed, t, epoch, 7]).permutation(k)
                for idx, batch in batches(
                    arrays, order, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size
                ):
                    if hypo:  # no samples this step: the KL term is masked out
                        draw = steps % self.cfg.hypo.every == 0
                        if draw:
                            start = time.perf_counter()
                            samples, tokens = self._online_samples(
                                arrays["prompt_idx_K"][idx], ref_params, t, steps
                            )
                            online["seconds"] += time.perf_counter() - start
                            online["prompts_regenerated"] += len(idx)
                            online["responses_generated"] += (
                                len(idx) * self.cfg.hypo.samples_per_prompt
                            )
                            online["tokens_generated"] += tokens
                        batch.update(samples)
                        batch["sample_mask_AM"] = batch["pair_mask_AM"] & draw
                    batch = distributed.put(batch, self._batch_sharding)
                    self.state, metrics = self._step(self.state, batch, self.frozen)
                    if pending is not None:  # fetch step N's metrics after N+1 is dispatched
                        fetch(pending, steps)
                    pending, steps = metrics, steps + 1
                    first = metrics if first is None else first
                    bar.update()
            if pending is not None:
                fetch(pending, steps)
        pairs = max(sums.get("num_pairs", 0.0), 1.0)
        prompts = max(sums.get("num_prompts", 0.0), 1.0)
        out = {
            key: value / (prompts if key in KL_METRICS else pairs)
            for key, value in sums.items()
            if key not in ("num_pairs", "num_prompts", "grad_norm")
        }
        out["steps"] = steps
        out["skipped_steps"] = skipped  # non-finite: the state was left as it was
        out["pairs_trained"] = sums.get("num_pairs", 0.0)
        counted = steps - skipped  # no counted step, no norm (null in metrics.jsonl)
        out["grad_norm"] = sums["grad_norm"] / counted if counted else float("nan")
        # the first step of a phase: with reference π_t, margins (and the KL) are exactly 0
        first = jax.device_get(first) if first is not None else {}
        out.update({f"first.{m}": float(first[m]) for m in ("margin", "kl") if m in first})
        if self.cfg.run.mode != "optune":
            self._count_generation(
                online["prompts_regenerated"],
                online["responses_generated"],
                online["tokens_generated"],
                online["seconds"],
            )
        return out, online

    @staticmethod
    def _add(sums, metrics):
        for key, value in metrics.items():
            if key in ("num_pairs", "num_prompts", "grad_norm"):
                w = 1.0
            else:  # means over pairs (or, for the KL term, over sampled prompts)
                w = float(metrics["num_prompts" if key in KL_METRICS else "num_pairs"])
            sums[key] = sums.get(key, 0.0) + w * float(value)

    # ------------------------------------------------------------------------ driver
    def run(self) -> list[dict]:
        cfg = self.cfg
        if self.next_iteration == 0:
            start = time.perf_counter()
            self.initial_eval, record = self._evaluate(self.policy_params(), initial=True)
            self.log.write(
                {
                    "iteration": -1,
                    **record,
                    "eval.win_score": 50.0,
                    "seconds.evaluation": time.perf_counter() - start,
                    **{f"data.train_{k}": v for k, v in self.train_stats.items()},
                    **{f"data.eval_{k}": v for k, v in self.eval_stats.items()},
                }
            )
        for t in tqdm(
            range(self.next_iteration, cfg.optune.iterations),
            desc="OPTune",
            unit="iter",
            disable=not self.progress,
            initial=self.next_iteration,
            total=cfg.optune.iterations,
        ):
            record = self.iteration(t)
            # the line before the checkpoint: a stop between them leaves a line past the newest
            # checkpoint, which a resume drops and writes again (the other order loses it)
            self.log.write(record)
            self.ckpt.save(
                t,
                state=self.state,
                host=self._host_state(),
                meta=dict(
                    next_iteration=t + 1,
                    totals=self.totals,
                    skipped_in_a_row=self.guard.in_a_row,
                    config=config_to_dict(cfg),
                ),
            )
            self.next_iteration = t + 1
            tqdm.write(_one_line(record))
        return self.log.read()

    def export(self) -> Path:
        """The policy as a transformers checkpoint in `output_dir/model`, written beside it and
        renamed when complete; refused (RunError) for non-finite parameters."""
        params = distributed.get(self.policy_params())  # every process joins the gather
        out = self.out / "model"
        if distributed.is_primary():
            if not all(np.isfinite(x).all() for x in jax.tree.leaves(params)):
                raise RunError(f"not exporting {out}: the parameters hold NaN or infinite values")
            replace_dir(
                out,
                lambda path: export_hf_checkpoint(
                    params, self.policy.config, path, tokenizer=self.policy.tokenizer
                ),
            )
        distributed.barrier("exported")
        return out

    def describe_data(self) -> str:
        """One line for the console: the prompts used, and why any were dropped or cut."""
        d = self.cfg.data
        line = functools.partial(data_lib.describe_prompts, max_tokens=d.max_prompt_tokens)
        return (
            f"prompts: training {line(self.train_stats)}, held-out {line(self.eval_stats)} "
            f"(data.max_prompt_tokens={d.max_prompt_tokens}, data.overlong={d.overlong})"
        )

    def close(self):
        self.log.close()
        self.ckpt.close()

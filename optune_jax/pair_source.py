"""Where each iteration's pairs come from: the one place `run.mode` is read.

- `SampledPairs(every_iteration=True)`: OPTune (design §4 steps 1-6): select the fraction ρ of
  prompts, sample `sampling.num_samples` responses each from π_t, reward them, pair the best
  with the worst, keep the rest from the pool.
- `SampledPairs(every_iteration=False)`: offline DPO / HyPO without a pair file: D_0 sampled
  from π_0 once, then trained on as it is.
- `FilePairs`: offline DPO / HyPO on `data.offline_files` (chosen 1.0, rejected 0.0 reward).
HyPO's online samples ride along as a per-step hook (`optune_jax.hypo`), chosen by the loss.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from losses import LOSSES, get_loss
from optune_jax import data as data_lib
from optune_jax import selection
from optune_jax.batch import PairBatch
from optune_jax.components import Policy
from optune_jax.generate import Generator
from optune_jax.pair_rows import layout, pair_batch
from optune_jax.prompts import PromptSet
from optune_jax.run.errors import RunError
from optune_jax.run.schema import RunConfig
from optune_jax.scoring import ResponseScorer, part_means

_FITS = {  # which losses each mode can feed: (needs samples, needs rewards, rewarded) -> ok
    "optune": lambda s, rewarded: not s.needs_samples,
    "offline": lambda s, rewarded: not s.needs_samples and (rewarded or not s.needs_rewards),
    "hypo": lambda s, rewarded: s.needs_samples,
}


def pairs_from_file(cfg: RunConfig) -> bool:
    """True when the run's pairs are read from `data.offline_files`; RunError (one line) when
    `loss.name` does not fit `run.mode`, or `sampling.num_samples` does not fit the pairs."""
    rewarded = not cfg.data.offline_files  # pairs from a file carry no rewards
    fits = functools.partial(_FITS[cfg.run.mode], rewarded=rewarded)
    loss = get_loss(cfg.loss.name)
    if not fits(loss):
        ok = [name for name, s in LOSSES.items() if fits(s)]
        raise RunError(
            f"loss.name={cfg.loss.name} does not fit run.mode={cfg.run.mode}; "
            f"allowed: {', '.join(ok)}"
        )
    from_file = cfg.run.mode != "optune" and bool(cfg.data.offline_files)
    if from_file and cfg.sampling.num_samples != 2:  # nothing is sampled to choose among
        raise RunError(f"sampling.num_samples={cfg.sampling.num_samples} has no effect on pairs "
                       "from data.offline_files; allowed: 2")
    return from_file


def make_source(cfg: RunConfig, policy: Policy, prompts: PromptSet, generator: Generator,
                scorer: ResponseScorer) -> PairSource:
    """The pair source `run.mode` (and `data.offline_files`) asks for."""
    if pairs_from_file(cfg):
        return FilePairs(cfg, policy, prompts)
    every = cfg.run.mode == "optune"
    return SampledPairs(cfg, policy, prompts, generator, scorer, every_iteration=every)


class PairSource:
    """`pairs(t, pi_t, timers)` -> (host PairBatch [Q], prompt indices [Q], record); `pool`:
    the responses kept between iterations (saved with each checkpoint)."""

    def __init__(self, cfg: RunConfig, policy: Policy, prompts: PromptSet):
        self.cfg, self.policy, self.prompts = cfg, policy, prompts
        self.pool = selection.PromptPool.empty(
            len(prompts.ids), cfg.sampling.max_new_tokens, pad_id=policy.pad_id
        )


class FilePairs(PairSource):
    """The pairs of `data.offline_files`, laid out once; nothing is generated."""

    def __init__(self, cfg: RunConfig, policy: Policy, prompts: PromptSet):
        super().__init__(cfg, policy, prompts)
        d, s = cfg.data, cfg.sampling
        enc = functools.partial(
            data_lib.encode_responses,
            tokenizer=policy.tokenizer,
            max_tokens=s.max_new_tokens,
            eos_id=policy.eos_ids[0],
            pad_id=policy.pad_id,
        )
        sides = [enc([r[c] for r in prompts.rows]) for c in (d.chosen_column, d.rejected_column)]
        tokens = np.stack([t for t, _ in sides], axis=1)
        lengths = np.stack([n for _, n in sides], axis=1)
        rows = layout(
            prompts.ids, tokens, lengths, prompt_len=d.max_prompt_tokens, pad_id=policy.pad_id
        )
        k = len(tokens)
        rewards = np.tile(np.float32([1.0, 0.0]), (k, 1))
        self.batch = PairBatch(
            *rows, np.zeros((k, 2), np.float32), rewards, np.ones((k,), bool)
        )
        self.prompt_idx = np.arange(k, dtype=np.int32)

    def pairs(self, t: int, pi_t, timers: dict):
        record = {
            "prompts_regenerated": 0,
            "responses_generated": 0,
            "tokens_generated": 0,
            "pairs": len(self.prompt_idx),
            "pairs_dropped_ties": 0,
        }
        return self.batch, self.prompt_idx, record


class SampledPairs(PairSource):
    """Pairs of responses sampled from the policy and rewarded (design §4 steps 1-6)."""

    def __init__(self, cfg: RunConfig, policy: Policy, prompts: PromptSet, generator: Generator,
                 scorer: ResponseScorer, *, every_iteration: bool):
        super().__init__(cfg, policy, prompts)
        self.generator, self.scorer, self.every_iteration = generator, scorer, every_iteration

    def pairs(self, t: int, pi_t, timers: dict):
        """Steps 1-6 of design §4 at iteration t; without `every_iteration`, only t = 0
        samples and later iterations keep every pair."""
        cfg, clock = self.cfg, time.perf_counter
        rng = np.random.default_rng([cfg.run.seed, t])
        # 1. select (design §4 step 1; everything at t = 0)
        idx = np.zeros((0,), np.int64)
        if self.every_iteration or t == 0:
            o = cfg.optune
            idx = selection.select(
                self.pool, o.rho, selection=o.selection, rank_key=o.rank_key, rng=rng
            )
        # 2. sample S responses per selected prompt from π_t
        s = cfg.sampling.num_samples
        start = clock()
        gen = self.generator(
            pi_t,
            [self.prompts.ids[i] for i in idx],
            idx,
            seed=cfg.run.seed,
            iteration=t,
            num_samples=s,
            desc=f"iter {t} generate",
            prefix=self.prompts.prefix,
        )
        timers["generation"] = clock() - start
        timers["generation_compile"] = gen.compile_seconds  # of which compiling (design §9)
        # 3. reward the new responses
        start = clock()
        new_rewards, parts = np.zeros((0, s), np.float32), {}
        if len(idx):
            new_rewards, parts = self.scorer.score_parts(
                [self.prompts.rows[i] for i in idx], gen.tokens, gen.lengths
            )
            # TRL's missing_eos_penalty: a response cut at the budget loses this much reward
            new_rewards -= cfg.reward.missing_eos_penalty * ~gen.finished
        timers["reward"] = clock() - start
        # 4-6. the best against the worst of the S (S = 2: the pair as drawn), assemble D_t,
        # choose winners, drop ties; the pool's rewards are the next ranking
        kept = selection.best_and_worst(gen.tokens, gen.lengths, new_rewards)
        self.pool = selection.update_pool(self.pool, idx, *kept, t)
        pairs = selection.build_pairs(self.pool, t)
        batch, prompt_idx = pair_batch(
            self.prompts.ids,
            pairs,
            prompt_len=cfg.data.max_prompt_tokens,
            pad_id=self.policy.pad_id,
            eos_ids=self.policy.eos_ids,
            drop_truncated=cfg.sampling.truncated == "drop",
        )
        record = {
            "prompts_regenerated": len(idx),
            "responses_generated": s * len(idx),
            "tokens_generated": gen.tokens_generated,
            "pairs": len(pairs.prompt_idx_Q),
            "pairs_dropped_ties": pairs.num_ties,
            "pairs_dropped_truncated": int(np.sum(~batch.pair_mask)),
            "reward_new": pairs.mean_reward_new,
            "reward_kept": pairs.mean_reward_kept,
            "responses_finished": float(np.mean(gen.finished)) if len(idx) else float("nan"),
            # mean over the new prompts of max - min of their S rewards: what S buys
            "reward_spread_new": float(np.mean(np.ptp(new_rewards, axis=1), dtype=np.float64))
            if len(idx)
            else float("nan"),
            **part_means("reward_new", parts),  # a weighted reward's components, unpenalised
        }
        return batch, prompt_idx, record

"""HyPO's online samples (design §5): a per-step hook that draws S exact samples per prompt of the
step's pairs from the current policy (temperature 1, no truncation) and scores them under π_0."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from optune_jax.batch import OnlineSamples, PairBatch
from optune_jax.generate import EXACT, Generator
from optune_jax.pair_rows import layout
from optune_jax.prompts import PromptSet
from optune_jax.reference import ReferenceLogps
from optune_jax.run.schema import HypoSection


@dataclasses.dataclass
class OnlineSampleHook:
    """`before_step` of `step_loop.run_steps` for one iteration: every `hypo.every` steps a fresh
    draw for the batch's prompts (the KL term is masked out on the other steps)."""

    hypo: HypoSection
    seed: int  # run.seed
    prompt_len: int  # data.max_prompt_tokens
    micro_batches: int  # A: train.batch_size // train.micro_batch_size
    generator: Generator
    ref_logps: ReferenceLogps
    prompts: PromptSet
    policy_params: object  # state -> the policy's full weights
    ref_params: object
    prompt_idx: np.ndarray  # [Q] prompt of each pair of D_t
    t: int
    samples: OnlineSamples | None = None
    counts: dict = dataclasses.field(
        default_factory=lambda: dict(
            prompts_regenerated=0, responses_generated=0, tokens_generated=0, seconds=0.0,
            compile_seconds=0.0,
        )
    )

    def __call__(self, idx: np.ndarray, batch: PairBatch, state, step: int) -> PairBatch:
        """`batch` (pairs `idx` of D_t) with this step's samples (`mask` False: none drawn)."""
        draw = step % self.hypo.every == 0
        if draw:
            start = time.perf_counter()
            self.samples = self.draw(self.prompt_idx[idx], state, step)
            self.counts["seconds"] += time.perf_counter() - start
        return batch.replace(samples=self.samples.replace(mask=batch.pair_mask & draw))

    def draw(self, prompt_idx: np.ndarray, state, step: int) -> OnlineSamples:
        s = self.hypo.samples_per_prompt
        prompts = [self.prompts.ids[i] for i in prompt_idx]
        gen = self.generator(
            self.policy_params(state),
            prompts,
            # a fresh draw per step: ids offset by the step keep draws independent
            prompt_idx + step * len(self.prompts.ids),
            seed=self.seed,
            iteration=self.t,
            num_samples=s,
            desc=f"iter {self.t} online samples",
            prefix=self.prompts.prefix,
            **EXACT,  # exact draws of π_θ whatever `sampling.*` says (design §5)
        )
        rows = layout(
            prompts,
            gen.tokens,
            gen.lengths,
            prompt_len=self.prompt_len,
            pad_id=self.generator.policy.pad_id,
        )
        ref = self.ref_logps(self.ref_params, *rows)
        self.counts["prompts_regenerated"] += len(prompt_idx)
        self.counts["responses_generated"] += len(prompt_idx) * s
        self.counts["tokens_generated"] += gen.tokens_generated
        self.counts["compile_seconds"] += gen.compile_seconds
        shaped = [x.reshape(self.micro_batches, -1, *x.shape[1:]) for x in (*rows, ref)]
        return OnlineSamples(*shaped, mask=np.zeros(shaped[-1].shape[:2], bool))

"""Phase: held-out reward of a policy and its drift from π_0 (design §6)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from optune_jax import drift, text_checks
from optune_jax.generate import EXACT, Generator, is_exact
from optune_jax.pair_rows import layout
from optune_jax.reference import ReferenceLogps
from optune_jax.run.schema import EvalSection, SamplingSection
from optune_jax.scoring import ResponseScorer, part_means

EVAL_SEED_OFFSET = 1_000_003  # held-out draws use their own stream, the same every iteration


def mean_ci95(x_N: np.ndarray) -> float:
    """Half-width of the normal 95 % confidence interval of the mean of `x_N` (nan below 2)."""
    x_N = np.asarray(x_N, np.float64)
    return float(1.96 * np.std(x_N, ddof=1) / np.sqrt(len(x_N))) if len(x_N) > 1 else float("nan")


@dataclasses.dataclass
class Evaluator:
    """Evaluates a policy on the held-out prompts (token ids, rows, shared prefix)."""

    settings: EvalSection
    sampling: SamplingSection
    seed: int  # run.seed
    prompt_len: int  # data.max_prompt_tokens
    prompt_column: str  # data.prompt_column
    generator: Generator
    scorer: ResponseScorer
    ref_logps: ReferenceLogps
    prompts: Sequence[Sequence[int]]
    rows: Sequence[dict]
    prefix: tuple[int, ...]
    initial_params: object  # π_0 (on the host); None without eval.drift
    pad_id: int

    def __call__(self, params, *, initial: bool = False) -> tuple[np.ndarray, dict]:
        """Held-out rewards [N] (each prompt's mean over `eval.samples_per_prompt` samples) and
        the evaluation's record.

        Rewards, length, EOS rate, '!' per answer and (for rows with a `topic`) the on-topic
        rate come from the samples drawn with the `sampling.*` settings. With `eval.drift`:
        KL(π_t‖π_0) per token on exact samples of π_t (each prompt's first sample when the
        settings are exact, else a draw at temperature 1 without truncation; 0 by definition for
        π_0 itself, `initial`), and π_t's greedy answers: their NLL under π_0, EOS rate, length,
        repetition, on-topic rate, and the first `eval.examples` of them as text.
        """
        e, s = self.settings, self.sampling
        draw = functools.partial(
            self.generator,
            params,
            self.prompts,
            np.arange(len(self.prompts)),
            seed=self.seed + EVAL_SEED_OFFSET,
            iteration=0,
            num_samples=e.samples_per_prompt,
            max_new=e.max_new_tokens,
            batch=e.batch_size,
            prefix=self.prefix,
        )
        gen = draw(desc="evaluate")
        texts = self.scorer.decode(gen.tokens, gen.lengths)
        rewards_NS, parts = self.scorer.score_texts(self.rows, texts, e.samples_per_prompt)
        record = {
            "eval.reward": float(np.mean(rewards_NS, dtype=np.float64)),
            "eval.prompts": len(self.prompts),
            "eval.samples": e.samples_per_prompt,
            **part_means("eval.reward", parts),
            "eval.eos_rate": float(np.mean(gen.finished)),
            "eval.response_tokens": float(np.mean(gen.lengths)),
            "eval.exclamations": text_checks.exclamations(texts),
        }
        topics = self._topics(e.samples_per_prompt)
        if topics is not None:
            record["eval.on_topic"] = text_checks.on_topic_rate(texts, topics)
        rewards = rewards_NS.mean(axis=1)
        if not e.drift:
            return rewards, record
        samples = gen.first(1)  # one exact sample per prompt for the KL estimate
        if not (is_exact(s) or initial):  # an unbiased KL estimate needs exact samples of π_t
            samples = draw(desc="evaluate: KL samples", iteration=1, num_samples=1, **EXACT)
        greedy = draw(desc="evaluate: greedy", greedy=True, num_samples=1)
        rows = layout(  # samples and greedy answers side by side: one π_0 pass for both
            self.prompts,
            np.concatenate([samples.tokens, greedy.tokens], axis=1),
            np.concatenate([samples.lengths, greedy.lengths], axis=1),
            prompt_len=self.prompt_len,
            pad_id=self.pad_id,
        )
        logp0 = self.ref_logps(self.initial_params, *rows, summed=True)
        logp_t = samples.logps.sum(-1)[:, 0]  # the sampler's logps: π_t's own when exact
        kl = 0.0 if initial else drift.kl_per_token(logp_t, logp0[:, 0], samples.lengths[:, 0])
        answers = self.scorer.texts(greedy.tokens[:, 0], greedy.lengths[:, 0])
        k = min(e.examples, len(self.prompts))
        column = self.prompt_column
        record.update({
            "eval.kl_initial": kl,
            "eval.nll_initial": drift.nll_per_token(logp0[:, 1], greedy.lengths[:, 0]),
            "eval.greedy_eos_rate": float(np.mean(greedy.finished)),
            "eval.greedy_tokens": float(np.mean(greedy.lengths)),
            "eval.greedy_rep4": drift.seq_rep_n(
                [t[:n] for t, n in zip(greedy.tokens[:, 0], greedy.lengths[:, 0], strict=True)]
            ),
            **({"eval.greedy_on_topic": text_checks.on_topic_rate(answers, self._topics(1))}
               if topics is not None else {}),
            "eval.examples": [
                {"prompt": r[column], "answer": a}
                for r, a in zip(self.rows[:k], answers[:k], strict=True)
            ],
        })
        return rewards, record

    def _topics(self, s: int) -> list[list[str]] | None:
        """Each row's `topic` stems, repeated for its s answers; None unless every row has one."""
        if not self.rows or not all(isinstance(r.get("topic"), list) for r in self.rows):
            return None
        return [r["topic"] for r in self.rows for _ in range(s)]

    @staticmethod
    def win_score(rewards_N: np.ndarray, initial_N: np.ndarray) -> float:
        """design §6: 50 + 100 · (wins − losses) / N against π_0's held-out rewards."""
        wins = int(np.sum(rewards_N > initial_N))
        losses = int(np.sum(rewards_N < initial_N))
        return 50.0 + 100.0 * (wins - losses) / len(rewards_N)

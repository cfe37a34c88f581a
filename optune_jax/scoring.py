"""Phase: the reward of sampled responses, from their decoded text (design §4 step 3)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from optune_jax.rewards import functions as rewards_lib


@dataclasses.dataclass
class ResponseScorer:
    """Decodes responses with the policy's tokenizer and scores them with reward `name`
    (`fn`: the function `rewards.make_reward` built for it, e.g. a reward model or a weighted
    sum); errors name the prompt from each row's `prompt_column`."""

    name: str
    tokenizer: object
    fn: object
    prompt_column: str = "prompt"

    def texts(self, tokens_NY: np.ndarray, lengths_N: np.ndarray) -> list[str]:
        return self.tokenizer.batch_decode(
            [t[:n] for t, n in zip(tokens_NY, lengths_N, strict=True)], skip_special_tokens=True
        )

    def decode(self, tokens_NSY: np.ndarray, lengths_NS: np.ndarray) -> list[str]:
        """The N·S responses' texts, prompt-major (S responses of prompt 0 first)."""
        n, s = lengths_NS.shape
        return self.texts(tokens_NSY.reshape(n * s, -1), lengths_NS.reshape(-1))

    def score_texts(
        self, rows: Sequence[dict], texts: Sequence[str], s: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """float32 rewards [N, S] of `texts` (S per row, prompt-major), and a weighted reward's
        components [N, S] by label ({} for any other reward)."""
        n = len(rows)
        rows = [r for r in rows for _ in range(s)]
        total, parts = rewards_lib.score_parts(
            self.name, rows, texts, fn=self.fn, prompt_column=self.prompt_column
        )
        return total.reshape(n, s), {k: v.reshape(n, s) for k, v in parts.items()}

    def score_parts(
        self, rows: Sequence[dict], tokens_NSY: np.ndarray, lengths_NS: np.ndarray
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """`score_texts` of the decoded responses [N, S, Y] to the N prompt rows."""
        texts = self.decode(tokens_NSY, lengths_NS)
        return self.score_texts(rows, texts, lengths_NS.shape[1])

    def __call__(
        self, rows: Sequence[dict], tokens_NSY: np.ndarray, lengths_NS: np.ndarray
    ) -> np.ndarray:
        """float32 rewards [N, S] of S responses to each of the N prompt rows."""
        return self.score_parts(rows, tokens_NSY, lengths_NS)[0]


def part_means(prefix: str, parts: dict[str, np.ndarray]) -> dict[str, float]:
    """{prefix.label: mean} of a weighted reward's components, for a metrics record."""
    return {f"{prefix}.{k}": float(np.mean(v, dtype=np.float64)) for k, v in parts.items()}

"""Phase: the reward of sampled responses, from their decoded text (SPEC §4 step 3)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from optune_jax import rewards as rewards_lib


@dataclasses.dataclass
class ResponseScorer:
    """Decodes responses with the policy's tokenizer and scores them with reward `name`
    (`fn`: the function `rewards.make_reward` built for it, e.g. a reward model)."""

    name: str
    tokenizer: object
    fn: object

    def texts(self, tokens_NY: np.ndarray, lengths_N: np.ndarray) -> list[str]:
        return self.tokenizer.batch_decode(
            [t[:n] for t, n in zip(tokens_NY, lengths_N, strict=True)], skip_special_tokens=True
        )

    def __call__(
        self, rows: Sequence[dict], tokens_NSY: np.ndarray, lengths_NS: np.ndarray
    ) -> np.ndarray:
        """float32 rewards [N, S] of S responses to each of the N prompt rows."""
        n, s = lengths_NS.shape
        texts = self.texts(tokens_NSY.reshape(n * s, -1), lengths_NS.reshape(-1))
        rows = [r for r in rows for _ in range(s)]
        return rewards_lib.score(self.name, rows, texts, fn=self.fn).reshape(n, s)

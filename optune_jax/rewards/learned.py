"""The learned reward of the loop (`reward: {name: model, path: DIR}`), a `RewardFn`.

    reward = ModelReward("runs/rm_ifeval/model")
    scores = reward(rows, responses)   # float32 [N]

`place` and `Scorer` (weights and jitted scoring, on one device or a mesh) also serve train_rm.

Each (row, response) becomes the conversation [user: row's prompt, assistant: response] under
the checkpoint's own chat template (the one `train_rm` trained with), batched by length into
power-of-two shapes and scored by one jitted `score_sequences` per shape. Given the run's mesh,
the weights are laid out like the policy's (the same logical-axis rules) and each batch is split
over the data axes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from models import ModelConfig, load_tokenizer
from models.reward_model import load_reward_checkpoint, reward_logical_axes, score_sequences
from optune_jax.rewards.rm_data import conversation, encode_conversation, score_all


def place(params, config: ModelConfig, layout=None):
    """Reward-model weights on the default device, or laid out like the policy's (the run's
    `optune_jax.sharding.Layout`)."""
    if layout is None:
        return jax.device_put(params)
    from optune_jax import sharding
    from optune_jax.run import distributed

    shardings = sharding.tree_shardings(params, reward_logical_axes(config), layout)
    return distributed.put(params, shardings)


class Scorer:
    """`(params, tokens_BT, mask_BT) -> float32 NumPy [B]`: `score_sequences` jitted once per
    shape; under a mesh each batch's rows are split over the data axes."""

    def __init__(self, config: ModelConfig, *, dtype="float32", layout=None):
        self.layout = layout
        score = functools.partial(score_sequences, config=config, dtype=dtype)
        if layout is None:
            self._score = jax.jit(score)
        else:
            from optune_jax import sharding

            self._score = jax.jit(
                sharding.with_rules(score, layout),
                out_shardings=sharding.replicated(layout.mesh),
            )

    def __call__(self, params, tokens_BT, mask_BT) -> np.ndarray:
        if self.layout is None:
            return np.asarray(self._score(params, tokens_BT, mask_BT))
        from optune_jax import sharding
        from optune_jax.run import distributed

        split = sharding.batch_sharding(self.layout, len(tokens_BT))
        tokens_BT, mask_BT = distributed.put((tokens_BT, mask_BT), split)
        return np.asarray(distributed.get(self._score(params, tokens_BT, mask_BT)))


class ModelReward:
    """Scores responses with a transformers Mistral/Llama sequence-classification checkpoint.

    Args:
      path: the checkpoint directory, with its tokenizer (train_rm's export has both).
      prompt_column: the row field holding the prompt text.
      dtype: "float32" or "bfloat16", for the weights and the computation.
      batch_size: sequences per call (rows are padded to a power of two up to it).
      max_tokens: longest conversation scored (its last tokens are kept); None: the model's
        max_position_embeddings.
      layout: the run's mesh and logical-axis rules (`optune_jax.sharding.Layout`); None: the
        default device.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        prompt_column: str = "prompt",
        dtype: str = "float32",
        batch_size: int = 32,
        max_tokens: int | None = None,
        layout=None,
    ):
        self.config, params = load_reward_checkpoint(path, dtype=dtype)
        self.params = place(params, self.config, layout)
        self.score_batch = Scorer(self.config, dtype=dtype, layout=layout)
        self.tokenizer = load_tokenizer(str(path))
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.prompt_column = prompt_column
        self.batch_size = batch_size
        self.max_tokens = max_tokens or self.config.max_position_embeddings

    def encode(self, rows: Sequence[dict], responses: Sequence[str]) -> list[list[int]]:
        """Token ids of each (prompt, response) conversation, at most `max_tokens` (the last)."""
        out = []
        for i, (row, text) in enumerate(zip(rows, responses, strict=True)):
            if not isinstance(row.get(self.prompt_column), str):
                raise ValueError(f"reward model: row {i} has no text field {self.prompt_column!r}")
            ids = encode_conversation(self.tokenizer, conversation(row[self.prompt_column], text))
            out.append(ids[-self.max_tokens :])
        return out

    def __call__(self, rows: Sequence[dict], responses: Sequence[str]) -> np.ndarray:
        return score_all(
            self.score_batch,
            self.params,
            self.encode(rows, responses),
            batch_size=self.batch_size,
            max_len=self.max_tokens,
            pad_id=self.pad_id,
        )

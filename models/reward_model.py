"""A reward model: the Mistral/Llama backbone plus a scalar head read at the last real token.

The parameter tree is the decoder's (`models.mistral`, without `lm_head`) plus `score/kernel`
[D, 1], the layout of transformers' MistralForSequenceClassification /
LlamaForSequenceClassification with num_labels = 1, so loading and export go through the same
tensor table as the policy (`models.hf_io`, head "score").
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.hf_io import CheckpointError, Params, export_hf_checkpoint, load_hf_checkpoint
from models.mistral import Transformer, forward

SCORE = "score"  # the head's key in the parameter tree


class ScoreHead(nn.Module):
    """Linear map of the final-normed hidden state to one float32 score (no bias)."""

    hidden_size: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h_BD):
        w = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("embed", None)),
            (self.hidden_size, 1),
            self.param_dtype,
        )
        return jnp.einsum("bd,do->bo", h_BD.astype(jnp.float32), w.astype(jnp.float32))[:, 0]


def _init_boxed(config: ModelConfig, rng: jax.Array, param_dtype: str):
    dtype = jnp.dtype(param_dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    backbone_rng, head_rng = jax.random.split(rng)
    backbone = Transformer(config, param_dtype=dtype).init(
        backbone_rng, tokens, tokens, jnp.ones((1, 1, 1), bool), return_hidden=True
    )["params"]  # return_hidden: the vocabulary head is never created
    head = ScoreHead(config.hidden_size, dtype).init(head_rng, jnp.zeros((1, config.hidden_size)))[
        "params"
    ]
    return {**backbone, SCORE: head}


def init_reward_params(config: ModelConfig, rng: jax.Array, *, param_dtype="float32") -> Params:
    """Random reward-model parameters (normal(0.02) kernels, unit norms) as a plain pytree."""
    init = jax.jit(lambda key: nn.unbox(_init_boxed(config, key, param_dtype)))
    return init(rng)  # one compiled program, not hundreds of eager ops


def reward_logical_axes(config: ModelConfig):
    """The reward model's logical axis names, as a pytree of `PartitionSpec`s."""
    abstract = jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0), "float32"))
    return nn.get_partition_spec(abstract)


def from_backbone(params: Params, config: ModelConfig, rng: jax.Array) -> Params:
    """A causal LM's parameters turned into a reward model's: `lm_head` dropped, a fresh head."""
    dtype = jax.tree.leaves(params)[0].dtype
    head = nn.unbox(
        ScoreHead(config.hidden_size, dtype).init(rng, jnp.zeros((1, config.hidden_size)))
    )["params"]
    return {**{k: v for k, v in params.items() if k != "lm_head"}, SCORE: head}


def last_token_index(mask_BT: jax.Array) -> jax.Array:
    """Index [B] of each row's last real token (left or right padding alike; 0 for empty rows)."""
    idx_BT = jnp.arange(mask_BT.shape[-1]) * mask_BT.astype(bool)
    return jnp.max(idx_BT, axis=-1)


def score_sequences(
    params: Params,
    tokens_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    config: ModelConfig,
    dtype="float32",
    remat: str = "none",
) -> jax.Array:
    """float32 scores [B]: the head applied to each sequence's last real token.

    Args:
      params: backbone tree plus `score/kernel` (see `init_reward_params`).
      tokens_BT, mask_BT: token ids and attention mask; padding on either side.
      config: the backbone architecture; dtype: compute dtype; remat: a layer remat policy.
    """
    backbone = {k: v for k, v in params.items() if k != SCORE}
    hidden_BTD = forward(
        backbone, tokens_BT, mask_BT, config=config, dtype=dtype, remat=remat, return_hidden=True
    )
    last_B = last_token_index(mask_BT)
    h_BD = jnp.take_along_axis(hidden_BTD, last_B[:, None, None], axis=1)[:, 0]
    return ScoreHead(config.hidden_size).apply({"params": params[SCORE]}, h_BD)


# ----------------------------------------------------------------------------- checkpoints
def num_labels(hf_config: dict) -> int:
    """Labels of a transformers classification config (its default is 2 without id2label)."""
    if hf_config.get("id2label"):
        return len(hf_config["id2label"])
    return int(hf_config.get("num_labels", 2))


def is_reward_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a transformers *ForSequenceClassification directory."""
    config_file = Path(path) / "config.json"
    try:
        archs = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def load_reward_checkpoint(
    path: str | Path, *, dtype: str = "float32"
) -> tuple[ModelConfig, Params]:
    """Reads a transformers Mistral/LlamaForSequenceClassification directory (num_labels = 1).

    Returns (config, params) with NumPy leaves; raises CheckpointError (one line) for another
    number of labels or a checkpoint without a score head.
    """
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        try:
            labels = num_labels(json.loads(config_file.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{config_file} is not a readable config ({e})") from None
        if labels != 1:
            raise CheckpointError(
                f"{path}: a reward model needs num_labels = 1 (one scalar score), "
                f"this checkpoint has num_labels = {labels}"
            )
    return load_hf_checkpoint(path, dtype=dtype, head=SCORE)


def export_reward_checkpoint(
    params: Params,
    config: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    dtype: str = "float32",
) -> Path:
    """Writes a directory `AutoModelForSequenceClassification.from_pretrained` loads (atomic).

    transformers finds each row's last token through `pad_token_id`, so the config gets the
    tokenizer's pad token when it names none.
    """
    if config.pad_token_id is None and tokenizer is not None:
        config = dataclasses.replace(config, pad_token_id=int(tokenizer.pad_token_id))
    return export_hf_checkpoint(
        params, config, out_dir, tokenizer=tokenizer, dtype=dtype, head=SCORE
    )

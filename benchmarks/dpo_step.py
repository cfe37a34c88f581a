"""Our side of one DPO optimizer step, shared by train_step_speed.py (against TRL) and
device_check.py: random token pairs, their batch as the loop lays it out, the step's model
FLOPs, and a function running the reference pass + `train_step` (see train_step_speed.py's
docstring for the details)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from models import ModelConfig
from optune_jax import train_step as ts
from optune_jax.batch import PairBatch
from optune_jax.optimizer import make_optimizer
from optune_jax.packing import key_cost, pack_batch
from optune_jax.pair_rows import layout

FIRST_ORDINARY_ID = 17  # SmolLM2's ids 0-16 are special tokens


def make_pairs(rng, pairs: int, prompt_tokens: int, response_tokens: int, vocab: int) -> list:
    """`pairs` examples {prompt_ids, chosen_ids, rejected_ids} of random ordinary token ids."""
    def draw(top: int, low_frac: float) -> list[int]:
        n = int(rng.integers(max(1, math.ceil(low_frac * top)), top + 1))
        return rng.integers(FIRST_ORDINARY_ID, vocab, n).tolist()

    return [dict(prompt_ids=draw(prompt_tokens, 0.8), chosen_ids=draw(response_tokens, 0.6),
                 rejected_ids=draw(response_tokens, 0.6)) for _ in range(pairs)]


def our_batch(examples: list, pad_id: int) -> tuple[PairBatch, int, int]:
    """(PairBatch [1, M], prompt_len, response width) of the examples, as the loop lays them out."""
    prompt_len = max(len(e["prompt_ids"]) for e in examples)
    width = max(len(e[k]) for e in examples for k in ("chosen_ids", "rejected_ids"))
    tokens_MSY = np.full((len(examples), 2, width), pad_id, np.int32)
    lengths_MS = np.zeros((len(examples), 2), np.int32)
    for i, e in enumerate(examples):
        for j, key in enumerate(("chosen_ids", "rejected_ids")):
            tokens_MSY[i, j, : len(e[key])], lengths_MS[i, j] = e[key], len(e[key])
    rows = layout([e["prompt_ids"] for e in examples], tokens_MSY, lengths_MS,
                  prompt_len=prompt_len, pad_id=pad_id)
    zeros = np.zeros((1, len(examples), 2), np.float32)
    batch = PairBatch(*(r[None] for r in rows), ref_logps=zeros, rewards=zeros,
                      pair_mask=np.ones((1, len(examples)), bool))
    return batch, prompt_len, width


def step_flops(c: ModelConfig, rows: int, length: int, logit_positions: int) -> float:
    """Model FLOPs of one of our steps over `rows` x `length` slots (see the module docstring)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    body = c.num_hidden_layers * (c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size
                                  * c.intermediate_size)
    fwd = (2 * body * rows * length + 2 * c.hidden_size * c.vocab_size * logit_positions
           + 4 * c.num_hidden_layers * q * rows * length * (length + 1) / 2)
    return 4 * fwd


def packed(batch: PairBatch, config: ModelConfig, prompt_len: int, *, pack: bool):
    """(batch, model FLOPs of one step, layout text): with `pack`, the rows packed once on the
    host into the lines the cost model picks."""
    if pack:
        batch = pack_batch(batch, prompt_len=prompt_len, key_cost=key_cost(config))
        w, length = batch.packed.tokens.shape[-2:]
        flops = step_flops(config, w, length, batch.packed.target.shape[-1])
        return batch, flops, f"{w} lines x {length} (packed)"
    rows, t = batch.tokens.shape[-3] * 2, batch.tokens.shape[-1]
    return batch, step_flops(config, rows, t, rows * (t - prompt_len)), f"{rows} rows x {t}"


def make_ours(params, config: ModelConfig, batch: PairBatch, prompt_len: int, dtype: str):
    """A function running one of our steps (reference pass + train step); returns the reference
    logps [M, 2]."""
    spec = ts.PolicySpec(config, dtype=dtype)
    loss = ts.LossChoice.from_values("dpo", {"beta": 0.1})
    opt = make_optimizer(name="rmsprop", learning_rate=1e-6, total_steps=100,
                         warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0)
    ref_params = jax.tree.map(jnp.copy, params)  # pi_0: its own buffers, never donated
    state = [ts.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=opt.init(params))]
    ref_fn = jax.jit(functools.partial(ts.pair_logps, policy=spec, prompt_len=prompt_len))
    step_fn = jax.jit(functools.partial(ts.train_step, optimizer=opt, policy=spec, loss=loss,
                                        prompt_len=prompt_len), donate_argnums=0)
    batch = jax.device_put(batch)
    micro = jax.tree.map(lambda x: x[0], batch)

    def run():
        ref_M2 = ref_fn(ref_params, micro)
        state[0], metrics = step_fn(state[0], batch.replace(ref_logps=ref_M2[None]))
        jax.block_until_ready((state[0], metrics))
        return np.asarray(ref_M2)

    return run

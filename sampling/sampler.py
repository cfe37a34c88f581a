"""The jitted batched sampler: one prefill, then a `lax.while_loop` of cached decode steps."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from models import KVCache, ModelConfig, decode_step, prefill, unstack_layers
from sampling.truncation import DRAW_PATHS, draw


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Static sampling controls (hashable: a jit static argument)."""

    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int
    num_samples: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    draw_path: str = "auto"  # `truncation.draw_path`: "auto" picks one per backend

    def __post_init__(self):
        checks = [
            (self.max_new_tokens > 0, f"max_new_tokens={self.max_new_tokens} must be > 0"),
            (len(self.eos_ids) > 0, "eos_ids must name at least one token id"),
            (self.num_samples > 0, f"num_samples={self.num_samples} must be > 0"),
            (self.temperature > 0, f"temperature={self.temperature} must be > 0 (use greedy)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 disables it)"),
            (self.draw_path in DRAW_PATHS, f"draw_path={self.draw_path!r} not in {DRAW_PATHS}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@struct.dataclass
class Samples:
    """Per prompt b and sample s: response tokens (pad after EOS), lengths, EOS flags, logps."""

    tokens_BSY: jax.Array  # int32
    lengths_BS: jax.Array  # int32, EOS included
    finished_BS: jax.Array  # bool: ended with one of the EOS ids
    logps_BSY: jax.Array  # float32 log-probabilities under the sampling distribution, 0 on pad
    steps: jax.Array  # int32: decode steps run (< max_new_tokens when every row ended early)


@struct.dataclass
class _LoopState:
    step: jax.Array
    logits_RV: jax.Array
    cache: KVCache
    tokens_RY: jax.Array
    logps_RY: jax.Array
    done_R: jax.Array
    lengths_R: jax.Array


def row_keys(
    seed: int | jax.Array, iteration: int | jax.Array, prompt_ids_B: jax.Array, num_samples: int
) -> jax.Array:
    """One key per (prompt id, sample index): independent of batch size and neighbours."""
    base = jax.random.fold_in(jax.random.key(seed), iteration)
    per_prompt = jax.vmap(lambda i: jax.random.fold_in(base, i))(prompt_ids_B)
    return jax.vmap(
        lambda k: jax.vmap(lambda s: jax.random.fold_in(k, s))(jnp.arange(num_samples))
    )(per_prompt).reshape(-1)


def _shard_cache(cache: KVCache) -> KVCache:
    """The cache's rows split like the batch and its keys and values over the kv heads (the
    rules in context decide the mesh axes; none outside a mesh), so no step regathers it."""
    kv = lambda x: nn.with_logical_constraint(x, ("batch", "kv_heads", None, None))
    return cache.replace(
        k_BKHC=tuple(map(kv, cache.k_BKHC)),
        v_BKCH=tuple(map(kv, cache.v_BKCH)),
        pos_BC=nn.with_logical_constraint(cache.pos_BC, ("batch", None)),
        next_pos_B=nn.with_logical_constraint(cache.next_pos_B, ("batch",)),
    )


def draw_next(keys_R, step, logits_RV, opts: SamplingOptions):
    if opts.greedy:
        token = jnp.argmax(logits_RV, axis=-1).astype(jnp.int32)
        return token, jnp.zeros(token.shape, jnp.float32)
    # inverse CDF: one uniform per row instead of a Gumbel draw per vocabulary entry
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_R)
    u_R = jax.vmap(jax.random.uniform)(step_keys)
    return draw(
        u_R,
        logits_RV,
        temperature=opts.temperature,
        top_k=opts.top_k,
        top_p=opts.top_p,
        path=opts.draw_path,
    )


@functools.partial(jax.jit, static_argnames=("config", "opts", "dtype"))
def generate(
    params,
    prompt_BT,
    mask_BT,
    prompt_ids_B,
    seed,
    iteration,
    prefix_F=None,
    pack_GW=None,
    *,
    config: ModelConfig,
    opts: SamplingOptions,
    dtype: str = "float32",
) -> Samples:
    """Samples `opts.num_samples` responses for each left-padded prompt.

    `prefix_F` (int32 [F]), when given, is a prefix shared by every prompt, computed once: row
    b's prompt is then prefix_F followed by its real tokens in `prompt_BT`. `pack_GW`, when
    given, prefills those tokens packed into lines (`models.prefill`, `pack_rows`).
    The draw for (prompt id, sample index, seed, iteration) does not depend on which other
    prompts share the batch. Decoding stops when every row has produced an EOS id or
    `max_new_tokens` are spent.
    """
    b, t = prompt_BT.shape
    p = 0 if prefix_F is None else prefix_F.shape[0]
    n, budget = opts.num_samples, opts.max_new_tokens
    logits_BV, cache = prefill(
        params,
        prompt_BT,
        mask_BT,
        config=config,
        max_len=p + t + budget,
        dtype=dtype,
        prefix_F=prefix_F,
        pack_GW=pack_GW,
    )
    # each prompt's prefill is shared by its n samples (every cache array but `index` leads with B)
    cache = jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, n, axis=0), cache)
    cache = _shard_cache(cache)
    # once, before the loop: each layer's weights in the compute dtype, read in place by every step
    layered = unstack_layers(jax.tree.map(lambda w: w.astype(dtype), params))
    rows = b * n
    keys_R = row_keys(seed, iteration, prompt_ids_B, n)
    eos = jnp.asarray(opts.eos_ids, jnp.int32)

    def record(s: _LoopState) -> tuple[_LoopState, jax.Array]:
        """Draws the token of step `s.step` from `s.logits_RV` (pad for finished rows)."""
        token, logp = draw_next(keys_R, s.step, s.logits_RV, opts)
        token = jnp.where(s.done_R, opts.pad_id, token)
        logp = jnp.where(s.done_R, 0.0, logp)
        return s.replace(
            step=s.step + 1,
            tokens_RY=jax.lax.dynamic_update_slice(s.tokens_RY, token[:, None], (0, s.step)),
            logps_RY=jax.lax.dynamic_update_slice(s.logps_RY, logp[:, None], (0, s.step)),
            done_R=s.done_R | jnp.isin(token, eos),
            lengths_R=s.lengths_R + (~s.done_R).astype(jnp.int32),
        ), token

    def body(s: _LoopState) -> _LoopState:
        s, token = record(s)
        logits, cache = decode_step(layered, token, s.cache, config=config, dtype=dtype)
        return s.replace(logits_RV=logits, cache=_shard_cache(cache))

    def cond(s: _LoopState):  # the last token needs no decode step after it: drawn below
        return (s.step < budget - 1) & ~jnp.all(s.done_R)

    init = _LoopState(
        step=jnp.zeros((), jnp.int32),
        logits_RV=jnp.repeat(logits_BV, n, axis=0),
        cache=cache,
        tokens_RY=jnp.full((rows, budget), opts.pad_id, jnp.int32),
        logps_RY=jnp.zeros((rows, budget), jnp.float32),
        done_R=jnp.zeros((rows,), bool),
        lengths_R=jnp.zeros((rows,), jnp.int32),
    )
    out = jax.lax.while_loop(cond, body, init)
    # the last draw; where every row had already ended it only writes pad over pad
    last, _ = record(out)
    steps = jnp.where(jnp.all(out.done_R), out.step, last.step)
    out = last
    return Samples(
        tokens_BSY=out.tokens_RY.reshape(b, n, budget),
        lengths_BS=out.lengths_R.reshape(b, n),
        finished_BS=out.done_R.reshape(b, n),  # only an EOS id sets done
        logps_BSY=out.logps_RY.reshape(b, n, budget),
        steps=steps,
    )

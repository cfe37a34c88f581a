"""The pure training step over preference pairs (`optune_jax.batch.PairBatch` [A, M]), and the
sequence logps it takes: of rows of prompt (left-padded to `prompt_len` columns) ⊕ response, or
of the same responses packed (`PackedRows`, `optune_jax.packing`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from losses import chosen_nll, get_loss, packed_sequence_logps, sequence_logps
from models import ModelConfig, forward, forward_packed
from models.lora import LoraSpec, merge
from optune_jax.batch import PackedRows, PairBatch
from optune_jax.optimizer import TrainState


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """What the step needs to know about the policy (static, hashable)."""

    config: ModelConfig
    dtype: str = "float32"
    remat: str = "none"
    average_logps: bool = False
    attention: str = "auto"  # the attention kernel (`models.attention.choose_attention`)


@dataclasses.dataclass(frozen=True)
class LossChoice:
    """A registered loss by name and its hyperparameters as (name, value) pairs; `rpo_alpha`
    adds RPO's NLL of the chosen responses to it (`losses.chosen_nll`, 0: off)."""

    name: str
    hyperparams: tuple[tuple[str, float], ...]
    rpo_alpha: float = 0.0

    @classmethod
    def from_values(cls, name: str, values: dict[str, float]) -> LossChoice:
        spec = get_loss(name)
        return cls(
            name,
            tuple((k, float(values[k])) for k in spec.hyperparams),
            float(values.get("rpo_alpha", 0.0)),
        )


def response_logps(params, tokens_BT, attn_BT, resp_BT, *, policy: PolicySpec, prompt_len: int):
    """Sequence logps [R] of each row's response (design §1); logits only over response columns."""
    logits = forward(
        params,
        tokens_BT[:, :-1],
        attn_BT[:, :-1],
        config=policy.config,
        dtype=policy.dtype,
        remat=policy.remat,
        attention=policy.attention,
        logits_from=prompt_len - 1,
    )
    return sequence_logps(
        logits, tokens_BT[:, prompt_len:], resp_BT[:, prompt_len:], average=policy.average_logps
    )


def packed_logps(params, packed: PackedRows, *, policy: PolicySpec, num_seqs: int):
    """Sequence logps [num_seqs] of packed responses (design §1); logits only at their targets."""
    logits = forward_packed(
        params,
        packed.tokens,
        packed.pos,
        packed.segment,
        packed.branch,
        packed.logit_at,
        config=policy.config,
        dtype=policy.dtype,
        remat=policy.remat,
        attention=policy.attention,
    )
    return packed_sequence_logps(
        logits, packed.target, packed.seq, num_seqs, average=policy.average_logps
    )


def branch_logps(params, micro: PairBatch, *, policy: PolicySpec, prompt_len: int):
    """Sequence logps [M, 2 (+ S)] of each pair's chosen and rejected (and HyPO's S samples of
    its prompt), in one pass over rows or packed lines."""
    m = micro.pair_mask.shape[0]
    s = 2 + (micro.samples.ref_logps.shape[1] if micro.samples is not None else 0)
    if micro.packed is not None:
        return packed_logps(params, micro.packed, policy=policy, num_seqs=m * s).reshape(m, s)
    rows = [[x.reshape(2 * m, -1)] for x in (micro.tokens, micro.attn, micro.resp)]
    if micro.samples is not None:
        samples = micro.samples
        for r, x in zip(rows, (samples.tokens, samples.attn, samples.resp), strict=True):
            r.append(x.reshape(m * (s - 2), -1))
    tokens, attn, resp = (jnp.concatenate(r, axis=0) for r in rows)
    logps = response_logps(params, tokens, attn, resp, policy=policy, prompt_len=prompt_len)
    return jnp.concatenate(
        [logps[: 2 * m].reshape(m, 2), logps[2 * m :].reshape(m, s - 2)], axis=1
    )


def _chosen_tokens(micro: PairBatch):
    """float32 [M]: the chosen responses' token counts (0 for pairs that packing left out)."""
    if micro.packed is None:
        return micro.resp[:, 0].sum(-1).astype(jnp.float32)
    m, s = micro.pair_mask.shape[0], micro.ref_logps.shape[1]
    if micro.samples is not None:
        s += micro.samples.ref_logps.shape[1]
    seq = micro.packed.seq
    counts = jax.ops.segment_sum((seq >= 0).astype(jnp.float32), jnp.where(seq >= 0, seq, m * s),
                                 num_segments=m * s + 1)
    return counts[: m * s].reshape(m, s)[:, 0]


def pair_logps(params, micro: PairBatch, *, policy: PolicySpec, prompt_len: int):
    """Sequence logps [M, 2] of the pairs (chosen, rejected) of a micro-batch [M]."""
    return branch_logps(params, micro, policy=policy, prompt_len=prompt_len)[:, :2]


def policy_loss(
    params, micro: PairBatch, *, policy: PolicySpec, loss: LossChoice, prompt_len: int
):
    """The configured loss on one micro-batch [M]: pairs (and HyPO's samples) in one pass."""
    spec = get_loss(loss.name)
    logps = branch_logps(params, micro, policy=policy, prompt_len=prompt_len)
    logps_M2 = logps[:, :2]
    extra = {}
    if spec.needs_rewards:
        extra = dict(chosen_rewards=micro.rewards[:, 0], rejected_rewards=micro.rewards[:, 1])
    if spec.needs_samples:
        extra = dict(
            sample_policy_logps_PS=logps[:, 2:],
            sample_reference_logps_PS=micro.samples.ref_logps,
            sample_mask_P=micro.samples.mask,
        )
    value, metrics = spec.fn(
        logps_M2[:, 0],
        logps_M2[:, 1],
        micro.ref_logps[:, 0],
        micro.ref_logps[:, 1],
        mask=micro.pair_mask,
        **extra,
        **dict(loss.hyperparams),
    )
    if loss.rpo_alpha:  # RPO (Pang et al. 2024, Eq. 2): + α · NLL(y_w) / |y_w|
        tokens = _chosen_tokens(micro)
        if policy.average_logps:  # the logps are per-token means already
            tokens = jnp.ones_like(tokens)
        nll = chosen_nll(logps_M2[:, 0], tokens, mask=micro.pair_mask)
        value, metrics = value + loss.rpo_alpha * nll, {**metrics, "nll_chosen": nll}
    return value, metrics


def _trainable_loss(trainable, micro, frozen, *, lora: LoraSpec | None, **kw):
    if lora is None:
        return policy_loss(trainable, micro, **kw)

    # BPO's ensemble (design §3): every adapter trains on the same pairs; losses averaged
    def one(adapter):
        return policy_loss(merge(frozen, trainable, lora, adapter=adapter), micro, **kw)

    values, metrics = jax.lax.map(one, jnp.arange(lora.num_adapters))
    return values.mean(), jax.tree.map(lambda x: x.mean(0), metrics)


def accumulated_step(state: TrainState, batch, loss_fn, *, optimizer):
    """One optimizer step over A micro-batches (gradient accumulation inside the step).

    `batch`: a typed batch [A, M] with a `pair_mask` (`optune_jax.batch`). `loss_fn(params,
    micro) -> (mean loss, metrics)` sees one micro-batch [M]. Each micro-batch's mean loss is
    weighted by its share of the counted pairs, so the step equals one step on the whole
    batch. Returns (new state, metrics averaged the same way, plus num_pairs and
    grad_norm, and skipped: 1.0 when the step was non-finite and the state is returned
    unchanged).
    """
    counts_A = jnp.sum(batch.pair_mask, axis=1).astype(jnp.float32)
    share_A = counts_A / jnp.maximum(jnp.sum(counts_A), 1.0)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def weighted(micro, share):
        (value, m), g = grad_fn(state.params, micro)
        m = {**m, "loss": value}
        return jax.tree.map(lambda x: share * x, g), jax.tree.map(lambda x: share * x, m)

    def accumulate(carry, xs):
        g, m = weighted(*xs)
        return jax.tree.map(jnp.add, carry, (g, m)), None

    # every micro-batch inside the scan, the sums from zeros: a first micro-batch peeled out of it
    # kept a second set of activation buffers (the main job's step: 6.3 -> 3.7 GiB, dryrun)
    zeros = jax.eval_shape(weighted, *jax.tree.map(lambda x: x[0], (batch, share_A)))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zeros)
    (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (batch, share_A))
    metrics["num_pairs"] = jnp.sum(counts_A)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    # a non-finite loss, gradient norm or update (its norm overflowing float32 too) leaves the
    # state as it was; the host counts these steps (run/guard.py) and stops a run of them
    ok = (
        jnp.isfinite(metrics["loss"])
        & jnp.isfinite(metrics["grad_norm"])
        & jnp.isfinite(optax.global_norm(updates))
    )
    metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
    new = TrainState(state.step + 1, params, opt_state)
    # a cond, not a select over every leaf: 1.1 GiB less at the 7B step's peak (dryrun)
    return jax.lax.cond(ok, lambda: new, lambda: state), metrics


def train_step(
    state: TrainState,
    batch: PairBatch,
    frozen=None,
    *,
    optimizer: optax.GradientTransformation,
    policy: PolicySpec,
    loss: LossChoice,
    prompt_len: int,
    lora: LoraSpec | None = None,
):
    """One optimizer step of the policy loss over A micro-batches (see `accumulated_step`).

    With `lora`, `state.params` are the adapters and `frozen` the base weights. Returns
    (new state, metrics).
    """
    loss_fn = lambda p, micro: _trainable_loss(
        p, micro, frozen, lora=lora, policy=policy, loss=loss, prompt_len=prompt_len
    )
    return accumulated_step(state, batch, loss_fn, optimizer=optimizer)

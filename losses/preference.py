"""Pairwise preference losses (design §2) and the Bradley–Terry reward-model loss.

Inputs are per-pair arrays of shape [B]: policy and reference logps of the chosen (y_w) and rejected
(y_l) responses. Every loss returns `(loss, metrics)`: `loss` is the mean over counted pairs of
weight × per-pair loss, `metrics` a dict of float32 scalars averaged over the same pairs.

`mask` (bool [B], True = counted) drops pairs such as ties. Masked entries are zeroed before any
arithmetic, so whatever they hold never reaches the loss or its gradients; an all-masked batch gives
loss 0 and zero gradients.
"""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


class _Pairs(NamedTuple):
    logratio_margin_B: jax.Array  # (pc − rc) − (pr − rr), unscaled
    chosen_reward_B: jax.Array  # implicit reward β1·(pc − rc)
    rejected_reward_B: jax.Array  # implicit reward β1·(pr − rr)
    weight_B: jax.Array
    mask_B: jax.Array

    @property
    def margin_B(self) -> jax.Array:
        return self.chosen_reward_B - self.rejected_reward_B  # h = β1·((pc − rc) − (pr − rr))


def _mask_or_all(mask: jax.Array | None, like_B: jax.Array) -> jax.Array:
    if mask is None:
        return jnp.ones(like_B.shape, bool)
    chex.assert_equal_shape([mask, like_B])
    return jnp.asarray(mask).astype(bool)


def _clean(x_B: jax.Array, mask_B: jax.Array) -> jax.Array:
    # where() before arithmetic: masked values get zero gradient even if they are huge or NaN.
    return jnp.where(mask_B, jnp.asarray(x_B, jnp.float32), 0.0)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    count = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
    return jnp.sum(jnp.where(mask, x, 0.0)) / count


def _pairs(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    beta: float,
    weights: jax.Array | None,
    mask: jax.Array | None,
) -> _Pairs:
    logps = [policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps]
    chex.assert_rank(logps, 1)
    chex.assert_equal_shape(logps)
    mask_B = _mask_or_all(mask, policy_chosen_logps)
    pc, pr, rc, rr = (_clean(x, mask_B) for x in logps)
    if weights is None:
        weight_B = mask_B.astype(jnp.float32)
    else:
        chex.assert_equal_shape([weights, policy_chosen_logps])
        weight_B = _clean(weights, mask_B)
    chosen_logratio_B, rejected_logratio_B = pc - rc, pr - rr
    return _Pairs(
        logratio_margin_B=chosen_logratio_B - rejected_logratio_B,
        chosen_reward_B=beta * chosen_logratio_B,
        rejected_reward_B=beta * rejected_logratio_B,
        weight_B=weight_B,
        mask_B=mask_B,
    )


def _reduce(pair_losses_B: jax.Array, pairs: _Pairs) -> tuple[jax.Array, Metrics]:
    # design §2: weight times per-pair loss, then the mean over counted pairs.
    mean = lambda x_B: masked_mean(x_B, pairs.mask_B)
    margin_B = pairs.margin_B
    metrics = {
        "margin": mean(margin_B),
        "accuracy": mean((margin_B > 0).astype(jnp.float32)),
        "chosen_implicit_reward": mean(pairs.chosen_reward_B),
        "rejected_implicit_reward": mean(pairs.rejected_reward_B),
        "weight": mean(pairs.weight_B),
        "num_pairs": jnp.sum(pairs.mask_B).astype(jnp.float32),
    }
    return mean(pairs.weight_B * pair_losses_B), metrics


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    weights: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """DPO (sigmoid) loss −log σ(h), h = β·((pc − rc) − (pr − rr)).

    Args:
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps:
        float [B] sequence logps.
      beta: β1, the implicit-reward scale.
      weights: optional float [B] per-pair weights (default 1).
      mask: optional bool [B]; False pairs are not counted.

    Returns:
      `(loss, metrics)`; metrics: margin (mean h), accuracy (h > 0), chosen_implicit_reward,
      rejected_implicit_reward (β·(p − r)), weight, num_pairs.
    """
    pairs = _pairs(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                   reference_rejected_logps, beta=beta, weights=weights, mask=mask)
    # Rafailov et al. 2023; OPTune Eq. (5).
    return _reduce(-jax.nn.log_sigmoid(pairs.margin_B), pairs)


def wdpo_weights(
    chosen_rewards: jax.Array, rejected_rewards: jax.Array, *, beta2: float
) -> jax.Array:
    """wDPO's per-pair weight σ(β2·(wc − wr)), a constant: no gradient flows into the rewards.

    Lies in [0.5, 1) when wc ≥ wr (float32 rounds it to 1 once β2·(wc − wr) ≳ 17).
    """
    gap_B = jnp.asarray(chosen_rewards, jnp.float32) - jnp.asarray(rejected_rewards, jnp.float32)
    return jax.lax.stop_gradient(jax.nn.sigmoid(beta2 * gap_B))  # OPTune Eq. (6)


def wdpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    beta: float = 0.1,
    beta2: float,
    weights: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """OPTune's weighted DPO: −σ(β2·(wc − wr)) · log σ(h).

    Args:
      policy_chosen_logps, ..., reference_rejected_logps, beta, weights, mask: as in `dpo_loss`.
      chosen_rewards, rejected_rewards: float [B] explicit rewards r(x, y_w), r(x, y_l).
      beta2: β2, the reward-gap scale of the weight.

    Returns:
      `(loss, metrics)` as `dpo_loss`; `weight` is the mean of σ(β2·(wc − wr)) × `weights`.
    """
    pairs = _pairs(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                   reference_rejected_logps, beta=beta, weights=weights, mask=mask)
    chex.assert_equal_shape([chosen_rewards, rejected_rewards, policy_chosen_logps])
    reward_weight_B = wdpo_weights(_clean(chosen_rewards, pairs.mask_B),
                                   _clean(rejected_rewards, pairs.mask_B), beta2=beta2)
    pairs = pairs._replace(weight_B=pairs.weight_B * reward_weight_B)
    # OPTune Eq. (6).
    return _reduce(-jax.nn.log_sigmoid(pairs.margin_B), pairs)


def ipo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    weights: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """IPO loss (h/β − 1/(2β))², minimal where the unscaled log-ratio margin h/β equals 1/(2β).

    Arguments and metrics as `dpo_loss`. IPO is usually run on per-token averaged logps (design §1).
    """
    pairs = _pairs(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                   reference_rejected_logps, beta=beta, weights=weights, mask=mask)
    # Azar et al. 2024, with h/β the unscaled margin (as in TRL).
    return _reduce((pairs.logratio_margin_B - 1.0 / (2.0 * beta)) ** 2, pairs)


def hinge_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    weights: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """SLiC hinge loss max(0, 1 − h). Arguments and metrics as `dpo_loss`."""
    pairs = _pairs(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                   reference_rejected_logps, beta=beta, weights=weights, mask=mask)
    # Zhao et al. 2023 (SLiC-HF).
    return _reduce(jax.nn.relu(1.0 - pairs.margin_B), pairs)


def chosen_nll(
    policy_chosen_logps: jax.Array,
    chosen_tokens: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Mean over counted pairs of the chosen response's per-token NLL, −log π(y_w) / |y_w|.

    The NLL term that RPO adds to DPO (Pang et al. 2024, Eq. 2; TRL's `rpo_alpha`): it keeps
    the chosen responses likely, where DPO alone may lower both sides of every pair.

    Args:
      policy_chosen_logps: float [B] sequence logps (sums over tokens) of the chosen responses.
      chosen_tokens: [B] their token counts (1 where the logps are already per-token means).
      mask: optional bool [B]; False pairs are not counted.
    """
    chex.assert_rank([policy_chosen_logps, chosen_tokens], 1)
    chex.assert_equal_shape([policy_chosen_logps, chosen_tokens])
    mask_B = _mask_or_all(mask, policy_chosen_logps)
    tokens_B = jnp.maximum(_clean(chosen_tokens, mask_B), 1.0)
    return masked_mean(-_clean(policy_chosen_logps, mask_B) / tokens_B, mask_B)


def bradley_terry_loss(
    chosen_scores: jax.Array,
    rejected_scores: jax.Array,
    *,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Reward-model loss −log σ(s_w − s_l): the Bradley–Terry likelihood of the observed preference.

    Args:
      chosen_scores, rejected_scores: float [B] scalar rewards of the chosen and rejected responses.
      mask: optional bool [B]; False pairs are not counted.

    Returns:
      `(loss, metrics)`; metrics: margin (mean s_w − s_l), accuracy (s_w > s_l), chosen_score,
      rejected_score, num_pairs.
    """
    chex.assert_rank([chosen_scores, rejected_scores], 1)
    chex.assert_equal_shape([chosen_scores, rejected_scores])
    mask_B = _mask_or_all(mask, chosen_scores)
    chosen_B, rejected_B = _clean(chosen_scores, mask_B), _clean(rejected_scores, mask_B)
    margin_B = chosen_B - rejected_B
    mean = lambda x_B: masked_mean(x_B, mask_B)
    metrics = {
        "margin": mean(margin_B),
        "accuracy": mean((margin_B > 0).astype(jnp.float32)),
        "chosen_score": mean(chosen_B),
        "rejected_score": mean(rejected_B),
        "num_pairs": jnp.sum(mask_B).astype(jnp.float32),
    }
    # Bradley & Terry 1952; the reward-model loss of Ouyang et al. 2022, Eq. (1).
    return mean(-jax.nn.log_sigmoid(margin_B)), metrics

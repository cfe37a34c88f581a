"""HyPO's KL regulariser on online samples (design §5) and the HyPO loss (design §2).

Samples come as [P, S]: S responses y ~ π_θ(· | x) for each of P prompts, with their sequence logps
under the policy (differentiable) and the reference.
"""

import chex
import jax
import jax.numpy as jnp

from losses.preference import Metrics, dpo_loss, masked_mean


def kl_surrogate(
    policy_logps_PS: jax.Array,
    reference_logps_PS: jax.Array,
    *,
    mask_P: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Surrogate whose gradient is an unbiased estimate of ∇ KL(π_θ ‖ π_ref).

    surrogate = mean over prompts of (1/S) Σ_i stop_gradient(ℓ_i − mean_{j≠i} ℓ_j) · log π_θ(y_i|x)
    with ℓ = log π_θ − log π_ref. Its VALUE is not the KL (that is `metrics["kl"]`); only its
    gradient matters. Differentiating ℓ itself would be wrong: E[∇ℓ] = E[∇ log π_θ] = 0, so the
    regulariser would silently vanish.

    Args:
      policy_logps_PS: float [P, S] policy logps of S samples per prompt (carries the gradient).
      reference_logps_PS: float [P, S] reference logps of the same samples.
      mask_P: optional bool [P]; False prompts are not counted.

    Returns:
      `(surrogate, metrics)`; metrics: kl (the plain estimate, mean ℓ), num_prompts.
      S = 1 has no other sample to form a baseline: the estimator is then the plain score-function
      one, ℓ · ∇ log π_θ, still unbiased but noisier.
    """
    chex.assert_rank(policy_logps_PS, 2)
    chex.assert_equal_shape([policy_logps_PS, reference_logps_PS])
    num_samples = policy_logps_PS.shape[1]
    if mask_P is None:
        mask_P = jnp.ones(policy_logps_PS.shape[:1], bool)
    chex.assert_shape(mask_P, policy_logps_PS.shape[:1])
    mask_P1 = jnp.asarray(mask_P).astype(bool)[:, None]
    # where() before arithmetic: masked prompts get zero gradient whatever they hold.
    policy_PS = jnp.where(mask_P1, jnp.asarray(policy_logps_PS, jnp.float32), 0.0)
    reference_PS = jnp.where(mask_P1, jnp.asarray(reference_logps_PS, jnp.float32), 0.0)

    logratio_PS = policy_PS - reference_PS
    if num_samples > 1:
        # RLOO: the other S − 1 samples are independent of y_i, so the baseline adds no bias.
        others_sum_PS = jnp.sum(logratio_PS, axis=1, keepdims=True) - logratio_PS
        baseline_PS = others_sum_PS / (num_samples - 1)
    else:
        baseline_PS = jnp.zeros_like(logratio_PS)
    # Score-function form ∇KL = E[ℓ · ∇ log π_θ] (design §5), RLOO baseline per HyPO's "k for RLOO".
    advantage_PS = jax.lax.stop_gradient(logratio_PS - baseline_PS)
    surrogate_P = jnp.mean(advantage_PS * policy_PS, axis=1)
    metrics = {
        "kl": masked_mean(jnp.mean(logratio_PS, axis=1), mask_P1[:, 0]),
        "num_prompts": jnp.sum(mask_P1).astype(jnp.float32),
    }
    return masked_mean(surrogate_P, mask_P1[:, 0]), metrics


def hypo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    *,
    sample_policy_logps_PS: jax.Array,
    sample_reference_logps_PS: jax.Array,
    beta: float = 0.1,
    lam: float,
    weights: jax.Array | None = None,
    mask: jax.Array | None = None,
    sample_mask_P: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """HyPO: DPO on offline pairs + λ · KL(π_θ ‖ π_ref) on online samples (Song et al. 2024).

    Args:
      policy_chosen_logps, ..., reference_rejected_logps, beta, weights, mask: the offline pairs,
        as in `dpo_loss`.
      sample_policy_logps_PS, sample_reference_logps_PS, sample_mask_P: the online samples, as in
        `kl_surrogate`.
      lam: λ, the weight of the KL term.

    Returns:
      `(loss, metrics)`: loss = DPO + λ · KL surrogate (its gradient is that of DPO + λ·KL, its
      value is not);
      metrics: those of `dpo_loss` and `kl_surrogate`, plus dpo_loss and kl_surrogate values.
    """
    dpo, dpo_metrics = dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                reference_rejected_logps, beta=beta, weights=weights, mask=mask)
    surrogate, kl_metrics = kl_surrogate(sample_policy_logps_PS, sample_reference_logps_PS,
                                         mask_P=sample_mask_P)
    metrics = {**dpo_metrics, **kl_metrics, "dpo_loss": dpo, "kl_surrogate": surrogate}
    return dpo + lam * surrogate, metrics  # design §2, HyPO row

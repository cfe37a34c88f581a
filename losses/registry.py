"""Policy losses by config name: the one place the training loop looks a loss up."""

import dataclasses
import types
from collections.abc import Callable, Mapping

from losses.kl import hypo_loss
from losses.preference import dpo_loss, hinge_loss, ipo_loss, wdpo_loss


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A policy loss and what a caller must pass it.

    Every `fn` takes the four per-pair logps (policy chosen, policy rejected, reference chosen,
    reference rejected) positionally, `mask=` (and optionally `weights=`) by keyword, and:
      needs_rewards: `chosen_rewards=`, `rejected_rewards=` (explicit rewards of the pair).
      needs_samples: `sample_policy_logps_PS=`, `sample_reference_logps_PS=` (online samples, and
        optionally `sample_mask_P=`).
      hyperparams: the names of the hyperparameters it reads, passed by keyword.
    It returns `(loss, metrics)`.
    """

    fn: Callable
    needs_rewards: bool = False
    needs_samples: bool = False
    hyperparams: tuple[str, ...] = ("beta",)


LOSSES: Mapping[str, LossSpec] = types.MappingProxyType({
    "dpo": LossSpec(dpo_loss),
    "wdpo": LossSpec(wdpo_loss, needs_rewards=True, hyperparams=("beta", "beta2")),
    "ipo": LossSpec(ipo_loss),
    "hinge": LossSpec(hinge_loss),
    "hypo": LossSpec(hypo_loss, needs_samples=True, hyperparams=("beta", "lam")),
})


def get_loss(name: str) -> LossSpec:
    """Returns the `LossSpec` registered as `name`; raises ValueError naming the known ones."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    return LOSSES[name]

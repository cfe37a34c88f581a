"""Preference-tuning losses: sequence logps (design §1), pairwise losses (§2), HyPO's KL term
(§5)."""

from losses.kl import hypo_loss, kl_surrogate
from losses.logps import packed_sequence_logps, sequence_logps, shift_labels, token_logps
from losses.preference import (
    bradley_terry_loss,
    chosen_nll,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    wdpo_loss,
    wdpo_weights,
)
from losses.registry import LOSSES, LossSpec, get_loss

__all__ = [
    "LOSSES",
    "LossSpec",
    "bradley_terry_loss",
    "chosen_nll",
    "dpo_loss",
    "get_loss",
    "hinge_loss",
    "hypo_loss",
    "ipo_loss",
    "kl_surrogate",
    "packed_sequence_logps",
    "sequence_logps",
    "shift_labels",
    "token_logps",
    "wdpo_loss",
    "wdpo_weights",
]

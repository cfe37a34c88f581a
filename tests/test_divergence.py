"""divergence.reasons: each sign of a collapsing run alone, against hand-made records."""

import math

import pytest

from optune_jax import divergence
from optune_jax.run.schema import EvalSection

INITIAL = {"iteration": -1, "eval.reward": 0.318, "eval.nll_initial": 0.9}
HEALTHY = {"iteration": 1, "eval.reward": 0.4, "eval.reward_gain": 0.082,
           "eval.reward_gain_ci95": 0.05, "eval.kl_initial": 0.2, "eval.nll_initial": 1.1,
           "train.loss": 0.6, "train.first.loss": 0.69}


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"train.loss": 217.0},
         "training loss 217 > eval.max_loss_ratio=10 × its first step's 0.69"),
        ({"train.loss": 6.0, "train.first.loss": 0.01}, None),  # the floor: 10 × log 2 = 6.93
        ({"train.loss": 7.0, "train.first.loss": 0.01}, "training loss 7 > eval.max_loss_ratio"),
        ({"eval.reward": 0.116, "eval.reward_gain": -0.202, "eval.reward_gain_ci95": 0.05},
         "held-out reward fell beyond noise (0.318 → 0.116, -0.202 ± 0.050)"),
        ({"eval.reward_gain": -0.04, "eval.reward_gain_ci95": 0.05}, None),  # within noise
        ({"eval.kl_initial": 1.5}, "KL to π_0 1.50 nats/token > eval.max_kl=1"),
        ({"eval.nll_initial": 2.0}, "NLL under π_0 of greedy answers 0.90 → 2.00 nats/token "
                                    "(rise > eval.max_nll_rise=1)"),
        ({"eval.reward_gain_ci95": math.nan, "eval.reward_gain": -1.0}, None),  # one prompt
    ],
)
def test_each_sign_alone(change, reason):
    got = divergence.reasons({**HEALTHY, **change}, INITIAL, EvalSection())
    if reason is None:
        assert got == []
    else:
        assert len(got) == 1 and got[0].startswith(reason), got


def test_healthy_off_and_missing_keys():
    assert divergence.reasons(HEALTHY, INITIAL, EvalSection()) == []
    wild = {**HEALTHY, "train.loss": 1e3, "eval.kl_initial": 9.0}
    assert len(divergence.reasons(wild, INITIAL, EvalSection())) == 2
    assert divergence.reasons(wild, INITIAL, EvalSection(divergence=False)) == []
    # without drift metrics or training (a record of the reward-model trainer, say): no reasons
    assert divergence.reasons({"iteration": 0, "eval.reward": 0.1}, INITIAL, EvalSection()) == []

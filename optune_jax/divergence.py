"""Is a run collapsing? An evaluation record against the initial one and the `eval` limits.

    reasons = divergence.reasons(record, initial, cfg.eval)   # [] when healthy

Everything can stay finite while a run collapses (learning rate 10 on the tiny config: the loss
climbs to 217 and greedy answers become "puberty puberty … cccc"), so the non-finite guard
never fires. Four signs, each a line: the iteration's mean training loss passed
`eval.max_loss_ratio` times its first step's (at least log 2, a DPO loss at zero margin), the
held-out reward fell beyond noise (the paired gain's 95 % interval lies below 0), the policy
drifted from π_0 past `eval.max_kl` nats per token, or π_0 finds the greedy answers far less
likely than its own (NLL rise past `eval.max_nll_rise`).
"""

from __future__ import annotations

import math

LOG2 = math.log(2.0)


def reasons(record: dict, initial: dict, limits) -> list[str]:
    """Why `record` (an iteration's metrics) looks diverged; [] when it does not, or when
    `limits.divergence` is off. Drift keys are read only when the record has them."""
    if not limits.divergence:
        return []
    out = []
    loss, first = record.get("train.loss"), record.get("train.first.loss")
    if loss is not None and first is not None:
        limit = limits.max_loss_ratio * max(first, LOG2)
        if loss > limit:
            out.append(f"training loss {loss:.3g} > eval.max_loss_ratio={limits.max_loss_ratio:g}"
                       f" × its first step's {first:.3g}")
    gain, half = record.get("eval.reward_gain"), record.get("eval.reward_gain_ci95")
    if gain is not None and half is not None and math.isfinite(half) and gain + half < 0:
        out.append(f"held-out reward fell beyond noise ({initial['eval.reward']:.3f} → "
                   f"{record['eval.reward']:.3f}, {gain:+.3f} ± {half:.3f})")
    kl = record.get("eval.kl_initial")
    if kl is not None and kl > limits.max_kl:
        out.append(f"KL to π_0 {kl:.2f} nats/token > eval.max_kl={limits.max_kl:g}")
    nll, nll0 = record.get("eval.nll_initial"), initial.get("eval.nll_initial")
    if nll is not None and nll0 is not None and nll - nll0 > limits.max_nll_rise:
        out.append(f"NLL under π_0 of greedy answers {nll0:.2f} → {nll:.2f} nats/token "
                   f"(rise > eval.max_nll_rise={limits.max_nll_rise:g})")
    return out

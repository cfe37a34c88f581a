"""The paper's claims read from groups of seeds (optune_jax.study.claims): verdicts against
hand-made paired differences, and generation cost ratios with compile seconds apart."""

import numpy as np
import pytest

from optune_jax.study import claims, stats


def _run(seed, final, *, initial=0.1, gen=(10.0, 5.0, 5.0), compile_s=(2.0, 1.0, 1.0),
         tokens=(1000, 500, 500)):
    iters = [{"iteration": t, "eval.reward": final if t == 2 else initial,
              "seconds.generation": g, "seconds.generation_compile": c, "tokens_generated": n}
             for t, (g, c, n) in enumerate(zip(gen, compile_s, tokens, strict=True))]
    return {"seed": seed, "initial": {"eval.reward": initial}, "iters": iters}


def _group(match, runs):
    config = {"run.mode": "optune", "optune.reference": "initial", **match}
    return stats.Group(stats.label(match), dict(match), config, runs)


FULL = {"optune.rho": 1.0, "loss.name": "wdpo"}
HALF = {"optune.rho": 0.5, "optune.selection": "reward", "loss.name": "wdpo"}


def test_each_claim_gets_its_paired_interval_and_verdict():
    full = _group(FULL, [_run(s, 0.5 + e) for s, e in enumerate([0.0, 0.02, -0.02])])
    # ρ = 0.5 ends 0.05 below ρ = 1 in every seed: the difference is resolved, but it keeps
    # 1 - 0.05 / 0.4 = 87.5 % of ρ = 1's gain of 0.4, so claim (1) holds
    half = _group(HALF, [_run(s, 0.45 + e) for s, e in enumerate([0.0, 0.02, -0.02])])
    random = _group({**HALF, "optune.selection": "random"},
                    [_run(s, 0.45 + e) for s, e in enumerate([0.03, -0.01, 0.0])])
    dpo = _group({**HALF, "loss.name": "dpo"},
                 [_run(s, 0.35 + e) for s, e in enumerate([0.0, 0.021, -0.019])])
    lines = claims.claim_lines([full, half, random, dpo])
    assert lines[0].startswith("## The paper's claims")
    one, two, three = lines[2:]
    assert "= -0.0500 ± 0.0000 held-out reward (3 paired seeds; share of ρ=1, loss=wdpo's " \
           "gain kept 88%). **holds: share of the gain kept 88% or more.**" in one
    d = np.array([-0.03, 0.03, -0.02])
    mean, half_width, _ = stats.mean_ci(d)
    assert f"= {mean:+.4f} ± {half_width:.4f}" in two and "**not resolved: the interval" in two
    assert "**holds.**" in three and "Fig. 6" in three


@pytest.mark.parametrize("d, gain, want", [
    ([-0.3, -0.31, -0.29], 0.4, "fails: share of the gain kept"),  # keeps 25 %
    ([-0.1, -0.3, 0.1], 0.4, "not resolved: share kept between"),
    ([0.01, 0.02, 0.03], 0.4, "holds: share of the gain kept 99% or more"),
])
def test_the_kept_share_verdict(d, gain, want):
    claim = claims.CLAIMS[0]
    assert claims.verdict(claim, np.array(d), gain).startswith(want)
    assert claims.verdict(claim, np.array(d[:1]), gain).startswith("not resolved (fewer")


def test_a_claim_whose_groups_are_missing_is_left_out():
    full = _group(FULL, [_run(0, 0.5), _run(1, 0.6)])
    assert claims.claim_lines([full]) == []
    assert claims.claim_lines([]) == []


def test_generation_cost_keeps_compile_apart_and_isolates_the_iterations_rho_controls():
    full = _group(FULL, [_run(s, 0.5, gen=(10.0, 10.0, 10.0), compile_s=(4.0, 0.0, 0.0),
                              tokens=(1000, 1000, 1000)) for s in range(2)])
    # ρ = 0.5: iteration 1 compiles its new batch shape (3 s); the rest runs in half the time
    half = _group(HALF, [_run(s, 0.5, gen=(10.0, 8.0, 5.0), compile_s=(4.0, 3.0, 0.0),
                              tokens=(1000, 500, 500)) for s in range(2)])
    gen, compile_s, tokens = claims.generation_cost(half.runs[0], first=1)
    assert (gen, compile_s, tokens) == (10.0, 3.0, 1000)
    rows = claims.cost_lines([full, half])
    assert rows[-1] == ("| ρ=0.5, selection=reward, loss=wdpo | 2000 (0.67×) | 16.0 (0.62×) | "
                        "7.0 | 1000 (0.50×) | 10.0 (0.50×) | 3.0 |")
    assert claims.cost_lines([half]) == []  # nothing to compare against

"""The OPTune paper's three claims, read from a study's groups of seeds (design §9): each as a
paired difference with its 95 % interval and a verdict, beside what the paper reports, and what
each variant's generation cost against full regeneration (ρ = 1), compile seconds apart.

Pure: groups (`stats.Group`, runs as `report.load_run` reads them) in, markdown lines out.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from optune_jax.study import stats

OPTUNE = {"run.mode": "optune"}  # (any one reference, shared by the groups compared)
HALF = {**OPTUNE, "optune.rho": 0.5, "optune.selection": "reward", "loss.name": "wdpo"}
FULL = {**OPTUNE, "optune.rho": 1.0, "loss.name": "wdpo"}


@dataclasses.dataclass(frozen=True)
class Claim:
    text: str
    variant: dict
    baseline: dict
    paper: str
    kept_share: bool = False  # judged by the share of the baseline's gain kept, not the sign


CLAIMS = (
    Claim("(1) regenerating the lowest-reward half keeps most (≥ 50 %) of full regeneration's "
          "gain", HALF, FULL, "Fig. 3: ρ = 0.5 and 0.7 on par with ρ = 1 by win score against "
          "Zephyr-7B-β, with 30-50 % of the generation saved", kept_share=True),
    Claim("(2) choosing the prompts by reward beats choosing them at random (ρ = 0.5)", HALF,
          {**HALF, "optune.selection": "random"}, "Fig. 3 and Table 2: OPTune above Rdm_ρ at "
          "every ρ; human raters preferred it 24.1 % to 14.8 % of the time (ρ = 0.7)"),
    Claim("(3) wDPO beats DPO on the same pairs (ρ = 0.5)", HALF, {**HALF, "loss.name": "dpo"},
          "Fig. 6: wDPO reaches a given win score in fewer iterations than DPO at every ρ"),
)


def _one(groups, match: dict):
    found = stats.matching(groups, match)
    return found[0] if len(found) == 1 else None


def _finals(g, key="eval.reward") -> dict[int, float]:
    return {r["seed"]: r["iters"][-1][key] for r in g.runs}


def _gains(g) -> dict[int, float]:
    return {r["seed"]: r["iters"][-1]["eval.reward"] - r["initial"]["eval.reward"]
            for r in g.runs}


def verdict(claim: Claim, d: np.ndarray, base_gain: float) -> str:
    """"holds", "fails" or "not resolved" at 95 % from paired differences `d` (variant −
    baseline) and, for a kept-share claim, the baseline's mean gain."""
    mean, half, n = stats.mean_ci(d)
    if n < 2:
        return "not resolved (fewer than 2 pairs)"
    if claim.kept_share:
        low, high = 1 + (mean - half) / base_gain, 1 + (mean + half) / base_gain
        if low >= 0.5:
            return f"holds: share of the gain kept {low:.0%} or more"
        if high < 0.5:
            return f"fails: share of the gain kept {high:.0%} or less"
        return f"not resolved: share kept between {low:.0%} and {high:.0%}"
    if stats.resolved(mean, half):
        return "holds" if mean > 0 else "fails: the baseline is ahead"
    return "not resolved: the interval includes 0"


def claim_lines(groups) -> list[str]:
    """One line per claim whose two groups are in the study (both with ≥ 1 shared seed)."""
    out = []
    for c in CLAIMS:
        v, b = _one(groups, c.variant), _one(groups, c.baseline)
        if v is None or b is None:
            continue
        d = stats.paired(_finals(v), _finals(b))
        mean, half, n = stats.mean_ci(d)
        base_gain = float(np.mean(list(_gains(b).values())))
        share = f"; share of {b.label}'s gain kept {1 + mean / base_gain:.0%}" if c.kept_share \
            else ""
        out.append(f"- **{c.text}**: {v.label} − {b.label} = {mean:+.4f} ± {half:.4f} held-out "
                   f"reward ({n} paired seeds{share}). **{verdict(c, d, base_gain)}.** "
                   f"Paper: {c.paper}.")
    if out:
        out = ["## The paper's claims (paired over seeds, 95 % Student-t intervals)", "", *out]
    return out


def generation_cost(run: dict, first: int = 0) -> tuple[float, float, int]:
    """(generation seconds without compiling, compile seconds, tokens) from iteration `first`
    on (iteration 0 regenerates every prompt whatever ρ is: 1 isolates what ρ controls)."""
    iters = run["iters"][first:]
    compile_s = sum(i.get("seconds.generation_compile", math.nan) for i in iters)
    gen = sum(i["seconds.generation"] for i in iters) - compile_s
    return gen, compile_s, sum(i["tokens_generated"] for i in iters)


def cost_lines(groups) -> list[str]:
    """Per OPTune group: tokens and generation seconds (compile apart) as ratios to ρ = 1's,
    over all iterations and over those after the first (where ρ acts)."""
    full = _one(groups, FULL)
    if full is None:
        return []
    rows = []
    for g in groups:
        if g.config.get("run.mode", "optune") != "optune":
            continue
        cells = []
        for first in (0, 1):
            mine = np.array([generation_cost(r, first) for r in g.runs]).mean(0)
            base = np.array([generation_cost(r, first) for r in full.runs]).mean(0)
            cells += [f"{mine[2]:.0f} ({mine[2] / base[2]:.2f}×)",
                      f"{mine[0]:.1f} ({mine[0] / base[0]:.2f}×)", f"{mine[1]:.1f}"]
        rows.append(f"| {g.label} | " + " | ".join(cells) + " |")
    return ["## Generation cost against full regeneration (ρ = 1), compile seconds apart", "",
            "Means over seeds. Iteration 0 regenerates every prompt under any ρ (the paper does "
            "the same), so over 3 iterations ρ = 0.5 can save at most a third; the columns from "
            "iteration 1 on show what ρ controls. Seconds are generation without the seconds "
            "spent tracing and compiling programs (or loading them from the compilation cache), "
            "which the last column of each half gives.", "",
            "| variant | tokens, all | generation s, all | compile s, all | tokens, t ≥ 1 | "
            "generation s, t ≥ 1 | compile s, t ≥ 1 |", "| --- " * 7 + "|", *rows]

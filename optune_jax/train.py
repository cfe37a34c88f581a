"""`python -m optune_jax.train --config FILE [--set key=value ...] [--resume | --overwrite]`."""

from __future__ import annotations

import sys

from optune_jax.cli import Trainer
from optune_jax.schema import RunConfig


def summary_table(records: list[dict]) -> str:
    """Markdown summary: held-out reward and drift from π_0 before/after, win score, generation
    saved, and the greedy answers to the first held-out prompts before and after tuning."""
    before = next(r for r in records if r["iteration"] == -1)
    iters = sorted((r for r in records if r["iteration"] >= 0), key=lambda r: r["iteration"])
    last = iters[-1]
    regenerated = last["total.prompts_regenerated"]
    everything = iters[0]["prompts_regenerated"] * len(iters)  # what ρ = 1 would regenerate
    saved = 100.0 * (1.0 - regenerated / everything) if everything else 0.0

    def both(key: str, fmt: str) -> tuple[str, str]:
        return tuple(
            "n/a" if r.get(key) is None else format(r[key], fmt) for r in (before, last)
        )

    rows = [
        ("held-out reward", *both("eval.reward", ".4f")),
        *([("held-out reward gain, paired (95 % interval)", "",
            f"{last['eval.reward'] - before['eval.reward']:+.3f} ± "
            f"{last['eval.reward_gain_ci95']:.3f}")] if "eval.reward_gain_ci95" in last else []),
        ("win score vs initial policy (SPEC §6)", "50.0", f"{last['eval.win_score']:.1f}"),
    ]
    if "eval.kl_initial" in last:  # eval.drift
        rows += [
            ("KL(π_t ‖ π_0) per token, on samples", *both("eval.kl_initial", ".3f")),
            ("NLL under π_0 of greedy answers, nats/token", *both("eval.nll_initial", ".3f")),
            ("greedy answers ending with EOS", *both("eval.greedy_eos_rate", ".0%")),
            ("greedy answer length, tokens", *both("eval.greedy_tokens", ".1f")),
            ("repeated 4-grams in greedy answers (seq-rep-4)", *both("eval.greedy_rep4", ".3f")),
        ]
    rows += [
        ("samples ending with EOS", *both("eval.eos_rate", ".0%")),
        ("sample length, tokens", *both("eval.response_tokens", ".1f")),
        ("prompts regenerated", "", f"{regenerated} of {everything} ({saved:.0f}% saved)"),
        ("tokens generated", "", str(last["total.tokens_generated"])),
        ("generation seconds", "", f"{last['total.generation_seconds']:.1f}"),
    ]
    lines = ["| metric | before | after |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    examples = zip(before.get("eval.examples") or [], last.get("eval.examples") or [], strict=False)
    for i, (old, new) in enumerate(examples):
        if i == 0:
            lines += ["", "Greedy answers to held-out prompts, initial policy and tuned policy:"]
        lines += ["", f"**{old['prompt']}**", "", "| before | after |", "| --- | --- |",
                  f"| {_cell(old['answer'])} | {_cell(new['answer'])} |"]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """`text` inside one Markdown table cell (pipes escaped, line breaks kept as <br>)."""
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"


TRAINER = Trainer(
    "python -m optune_jax.train",
    "Online preference tuning with OPTune (reward-based regeneration + wDPO).",
    RunConfig, "optune_jax.loop:OptuneRun", summary_table, "transformers model",
)

main = TRAINER.main

if __name__ == "__main__":
    sys.exit(main())

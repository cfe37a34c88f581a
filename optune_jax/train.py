"""`python -m optune_jax.train --config FILE [--set key=value ...] [--resume | --overwrite]`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from optune_jax import run_plot
from optune_jax.run.cli import Trainer
from optune_jax.run.schema import RunConfig


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
        ("win score vs initial policy (design §6)", "50.0", f"{last['eval.win_score']:.1f}"),
        *[(f"held-out reward: component {k.removeprefix('eval.reward.')}", *both(k, ".4f"))
          for k in sorted(last) if k.startswith("eval.reward.")],
    ]
    if "eval.on_topic" in last:  # rows with a `topic`: does the answer still name its subject?
        rows.append(("samples that name their prompt's subject", *both("eval.on_topic", ".0%")))
    if "eval.greedy_on_topic" in last:
        rows.append(("greedy answers that name their prompt's subject",
                     *both("eval.greedy_on_topic", ".0%")))
    if "eval.exclamations" in last:
        rows.append(("'!' per sample", *both("eval.exclamations", ".2f")))
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


def headline(records: list[dict], out: Path) -> str:
    """The run in one line of words: held-out reward before → after, the paired gain with its 95 %
    interval and whether it excludes 0, drift from π_0, and where the answers and the plot are."""
    before = next(r for r in records if r["iteration"] == -1)
    last = max((r for r in records if r["iteration"] >= 0), key=lambda r: r["iteration"])
    gain, half = last["eval.reward"] - before["eval.reward"], last.get("eval.reward_gain_ci95")
    words = f"held-out reward {before['eval.reward']:.3f} → {last['eval.reward']:.3f}"
    if half is not None and np.isfinite(half):
        over = ""
        if "eval.prompts" in last:
            over = f", paired over {last['eval.prompts']} prompts × {last['eval.samples']} samples"
        verdict = "beyond noise" if abs(gain) > half else "within noise: the interval includes 0"
        words += f", {gain:+.3f} ± {half:.3f} (95 %{over}; {verdict})"
    if "eval.kl_initial" in last:
        words += (f"; KL to π_0 {last['eval.kl_initial']:.2f} nats/token, NLL of greedy answers "
                  f"under π_0 {last['eval.nll_initial'] - before['eval.nll_initial']:+.2f}")
    if "eval.on_topic" in last:
        words += f", on topic {before['eval.on_topic']:.0%} → {last['eval.on_topic']:.0%}"
    shown = "greedy answers above, " if last.get("eval.examples") else ""
    diverged = [r for r in records if r.get("diverged")]
    if diverged:  # the exported model is that policy: never without saying so
        first = min(diverged, key=lambda r: r["iteration"])
        words = (f"DIVERGED at iteration {first['iteration']} ({'; '.join(first['diverged'])}): "
                 f"the final policy went on from there; {words}")
    return f"In words: {words}; {shown}curves in {out / run_plot.FILE}."


def _cell(text: str) -> str:
    """`text` inside one Markdown table cell (pipes escaped, line breaks kept as <br>)."""
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def make_run(cfg: RunConfig, **kw):
    """The run `cfg` describes (`loop.OptuneRun`; JAX loads once the config is valid)."""
    from optune_jax.loop import OptuneRun

    return OptuneRun(cfg, **kw)


TRAINER = Trainer(
    "python -m optune_jax.train",
    "Online preference tuning with OPTune (reward-based regeneration + wDPO).",
    RunConfig, make_run, summary_table, "transformers model",
    headline=headline, plot=run_plot.plot_run,
)

main = TRAINER.main

if __name__ == "__main__":
    sys.exit(main())

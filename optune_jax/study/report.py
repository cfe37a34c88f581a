"""`python -m optune_jax.study.report RUN_DIR... [--out DIR] [--against KEY=VALUE...]`: a study's
plots and tables.

Runs are grouped by every config key that differs between them (`stats.relevant`: not the
seed, the output directory and other keys that cannot change results); the runs of a group are
its seeds. Per group: final held-out reward and win score with 95 % Student-t intervals,
generation cost and time; paired differences (runs matched by `run.seed`) against baseline
groups (`--against "optune.rho=1.0"`, repeatable; default ρ = 1 and random selection where
they exist). Plots as the OPTune paper does: held-out reward by iteration (Fig. 3), against
cumulative generation seconds (Fig. 5), the time split per phase against the paper's Table 1,
and from each run's per-prompt reward history the split of the reward gain between the bottom
and top half of the prompts (Fig. 2, `fig2.png`). Runs that measured drift (`eval.drift`) also
get the reward–KL frontier (held-out reward against KL(π_t‖π_0) per token, one point per
iteration with intervals over seeds; the DPO paper's Fig. 2). Where the study holds the
groups they need, the OPTune paper's three claims come first, each with its verdict
(`claims`), and the generation cost against ρ = 1 with compile seconds apart. Writes PNGs and
`report.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from optune_jax import reward_history
from optune_jax.run.metrics_log import read_records
from optune_jax.study import claims, plots, stats
from optune_jax.study.stats import (
    PAPER_SPLIT,
    PHASES,
    curves,
    final,
    frontier_points,
    gain_split,
    phase_split,
)


def load_run(path: Path) -> dict:
    """A run directory: its flat config, seed, metrics records and (when the run wrote one)
    per-prompt reward history as arrays (`reward_history.arrays`), else None."""
    flat = stats.flatten(yaml.safe_load((path / "config.yaml").read_text()))
    records = [json.loads(ln) for ln in (path / "metrics.jsonl").read_text().splitlines() if ln]
    iters = [r for r in records if r["iteration"] >= 0]
    history = None
    if (path / reward_history.FILE).is_file():
        lines, _ = read_records(path / reward_history.FILE)  # a torn last line left out
        lines = [h for h in lines if h["iteration"] < len(iters)]
        history = reward_history.arrays(lines) if lines else None
    planned = flat.get("optune.iterations", len(iters))
    return dict(path=path, flat=flat, seed=flat.get("run.seed", 0), initial=records[0],
                iters=iters, history=history, planned=planned)


def unfinished(runs: list[dict]) -> list[str]:
    """One line per run that stopped before its planned iterations: its "final" is earlier."""
    return [f"{r['path']} is unfinished: {len(r['iters'])} of {r['planned']} iterations; its "
            f"final figures are after iteration {len(r['iters']) - 1}"
            for r in runs if len(r["iters"]) < r["planned"]]


def group(runs: list[dict], ignore=()) -> list[stats.Group]:
    """The runs' groups by every config key that differs between them (`stats.group_runs`)."""
    return stats.group_runs(runs, [stats.relevant(r["flat"], ignore) for r in runs])


def _ci(x, digits: int) -> str:
    mean, half, n = stats.mean_ci(x)
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def table(groups: list[stats.Group]) -> str:
    """One row per group: seeds, held-out reward and win score (mean ± 95 % CI half-width),
    cost, time; then the time split per phase against the paper's Table 1."""
    common = stats.label(stats.shared([g.config for g in groups]))
    full = stats.matching(groups, {"optune.rho": 1.0})
    full_secs = (np.mean([final(r)["seconds"] for r in full[0].runs])
                 if len(full) == 1 else None)
    lines = ["## Variants (the runs of a variant are its seeds; ± : 95 % Student-t interval)", "",
             f"Shared by every variant (where read): {common}.", "",
             "| variant | seeds | held-out reward: initial → final (mean ± 95 % CI) | "
             "win score (± 95 % CI) | prompts regenerated | tokens generated | "
             "generation s (+ compile s) | "
             "iteration s | speed-up vs ρ=1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    drift = all(frontier_points(r) is not None for g in groups for r in g.runs)
    if drift:  # the final policy's distance from π_0 (eval.drift)
        lines[4] += " KL to π_0 | NLL under π_0 (greedy): initial → final | EOS rate |"
        lines[5] += " --- | --- | --- |"
    for g in groups:
        runs = g.runs
        ends = [final(r) for r in runs]
        init = curves(runs, "eval.reward")[:, 0].mean()
        regen = np.mean([r["iters"][-1]["total.prompts_regenerated"] for r in runs])
        gen = np.mean([r["iters"][-1]["total.generation_seconds"] for r in runs])
        comp = np.mean([r["iters"][-1].get("total.generation_compile_seconds", np.nan)
                        for r in runs])  # (runs before compile seconds were kept: nan)
        tokens = np.mean([e["tokens generated"] for e in ends])
        secs = np.mean([e["seconds"] for e in ends])
        speed = f"{full_secs / secs:.2f}×" if full_secs else "n/a"
        lines.append(f"| {g.label} | {len(runs)} | {init:.4f} → "
                     f"{_ci([e['held-out reward'] for e in ends], 4)} | "
                     f"{_ci([e['win score'] for e in ends], 1)} | {regen:.0f} | {tokens:.0f} | "
                     + (f"{gen - comp:.1f} (+{comp:.1f})" if np.isfinite(comp) else
                        f"{gen:.1f} (compile not kept)") + f" | {secs:.1f} | {speed} |")
        if drift:
            nll = curves(runs, "eval.nll_initial")
            lines[-1] += (f" {curves(runs, 'eval.kl_initial')[:, -1].mean():.3f} |"
                          f" {nll[:, 0].mean():.2f} → {nll[:, -1].mean():.2f} |"
                          f" {curves(runs, 'eval.eos_rate')[:, -1].mean():.0%} |")
    split = ["", "| phase | paper Table 1 | " + " | ".join(g.label for g in groups) + " |",
             "| --- | --- | " + " | ".join("---" for _ in groups) + " |"]
    for phase in PHASES:
        ours = " | ".join(f"{phase_split(g.runs)[phase]:.1f}%" for g in groups)
        paper = f"{PAPER_SPLIT[phase]:.1f}%" if phase in PAPER_SPLIT else "(in training)"
        split.append(f"| {phase} | {paper} | {ours} |")
    return "\n".join(lines + split)


COMPARED = {"held-out reward": 4, "win score": 1}  # paired differences: metric -> digits


def differences(groups: list[stats.Group], against: list[str]) -> str:
    """Paired differences (variant − baseline, runs matched by `run.seed`) of the final
    held-out reward and win score, mean ± 95 % CI, and which intervals exclude 0."""
    lines = ["## Paired differences (variant − baseline, runs matched by run.seed)", "",
             "| baseline | variant | pairs | " + " | ".join(f"Δ {m} (± 95 % CI)" for m in COMPARED)
             + " |", "| --- | --- | --- | " + " | ".join("---" for _ in COMPARED) + " |"]
    notes, yes, no, done = [], [], [], set()
    for spec in against:
        found = stats.matching(groups, stats.parse_match(spec))
        if len(found) != 1:
            notes.append(f"- `{spec}`: matches {len(found)} groups, not one; no comparison.")
            continue
        base = found[0]
        for g in groups:
            if g is base or frozenset((id(g), id(base))) in done:  # each pair once
                continue
            done.add(frozenset((id(g), id(base))))
            n = 0
            cells = []
            for metric, digits in COMPARED.items():
                fmt = f"+.{digits}f"
                d = stats.paired({r["seed"]: final(r)[metric] for r in g.runs},
                                 {r["seed"]: final(r)[metric] for r in base.runs})
                mean, half, n = stats.mean_ci(d)
                cell = f"{mean:{fmt}} ± {half:.{digits}f}" if n > 1 else "–"
                cells.append(f"{mean:{fmt}}" if n == 1 else cell)
                if n > 1:
                    what = f"{g.label} vs {base.label}: {metric} {cell}"
                    (yes if stats.resolved(mean, half) else no).append(what)
            lines.append(f"| {base.label} | {g.label} | {n} | " + " | ".join(cells) + " |")
    if len(lines) == 4:
        lines.append("| – | – | 0 | " + " | ".join("–" for _ in COMPARED) + " |")
    lines += ["", *notes, "Resolved (the 95 % interval excludes 0):",
              *[f"- {x}" for x in yes or ["none"]], "",
              "Not resolved (the interval includes 0):", *[f"- {x}" for x in no or ["none"]],
              "", "(Fewer than 2 pairs give no interval: neither.)"]
    return "\n".join(lines)


def gain_table(groups: list[stats.Group]) -> str:
    """Fig. 2's numbers: per group and iteration, each half's share of the gain and its mean
    per-prompt gain, averaged over seeds; "" when no run has a history."""
    rows = []
    for g in groups:
        s = gain_split(g.runs)
        for i in range(len(s["iteration"]) if s else 0):
            rows.append(f"| {g.label} | {s['iteration'][i]} | {s['seeds']} | "
                        f"{s['share_bottom'][i]:.1%} | {s['share_top'][i]:.1%} | "
                        f"{s['mean_gain_bottom'][i]:+.4f} | {s['mean_gain_top'][i]:+.4f} |")
    if not rows:
        return ""
    return "\n".join([
        "## Where the reward gain comes from (the OPTune paper's Fig. 2)", "",
        "Prompts split in halves by their chosen reward at the end of iteration t-1; the share "
        "of the summed gain in chosen reward from t-1 to t that each half holds. With ρ < 1 a "
        "kept prompt's gain is 0 by construction, and the bottom half gains partly by regression "
        "to the mean (its rewards at t-1 were selected low), so only ρ = 1 reads as the paper's "
        "figure. When the halves' gains nearly cancel, the shares leave [0, 100 %] and swing "
        "widely; the mean gains per half are the steadier numbers.", "",
        "| variant | iteration | seeds | bottom half's share | top half's share | "
        "mean gain, bottom | mean gain, top |",
        "| --- | --- | --- | --- | --- | --- | --- |", *rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m optune_jax.study.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--against", action="append", default=None, metavar="\"KEY=VALUE ...\"",
                   help="a baseline group for paired differences, picked by its config values "
                        "(repeatable; default: optune.rho=1.0 and optune.selection=random where "
                        "each matches one group)")
    p.add_argument("--ignore", action="append", default=[], metavar="KEY",
                   help="a config key (or 'section.') that does not tell groups apart, besides "
                        "the seed, output dir and the other keys of stats.IGNORED")
    args = p.parse_args(argv)
    runs = []
    for path in args.runs:
        if not (path / "metrics.jsonl").is_file() or not (path / "config.yaml").is_file():
            print(f"error: {path} is not a run directory (no metrics.jsonl/config.yaml)",
                  file=sys.stderr)
            return 2
        run = load_run(path)
        if run["iters"]:
            runs.append(run)
    if not runs:
        print("error: none of the runs has a completed iteration", file=sys.stderr)
        return 2
    partial = unfinished(runs)
    for line in partial:
        print(f"note: {line}", file=sys.stderr)
    groups = group(runs, args.ignore)
    against = stats.default_baselines(groups) if args.against is None else args.against
    try:
        for spec in against:
            stats.parse_match(spec)
    except ValueError as e:
        print(f"error: --against: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    files = plots.plot(groups, args.out)
    notes = "\n".join(f"Note: {line}." for line in partial)
    text = "\n\n".join(x for x in (notes, "\n".join(claims.claim_lines(groups)), table(groups),
                                    "\n".join(claims.cost_lines(groups)),
                                    differences(groups, against), gain_table(groups)) if x)
    body = text + "\n\n" + "\n".join(f"![{f}]({f})" for f in files) + "\n"
    (args.out / "report.md").write_text(body)
    print(text)
    print(f"wrote {', '.join(files)} and report.md to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

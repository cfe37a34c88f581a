"""`python -m optune_jax.report RUN_DIR... [--out DIR]`: the ρ study's plots and table.

Groups runs by (ρ, selection) over seeds and draws, as the OPTune paper does: held-out reward
by iteration (Fig. 3), held-out reward against cumulative generation seconds (Fig. 5), and the
time split per phase against the paper's Table 1. Runs that measured drift (`eval.drift`) also
get the reward–KL frontier (held-out reward against KL(π_t‖π_0) per token, one point per
iteration, one line per run; the DPO paper's Fig. 2). Writes PNGs and `report.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

PAPER_SPLIT = {"generation": 71.8, "reward": 0.1, "training": 28.1}  # Table 1, % of an iteration
PHASES = ("generation", "reward", "reference", "training")


def load_run(path: Path) -> dict:
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    records = [json.loads(ln) for ln in (path / "metrics.jsonl").read_text().splitlines() if ln]
    mode = cfg["run"].get("mode", "optune")
    selection = cfg["optune"]["selection"] if cfg["optune"]["rho"] < 1.0 else "reward"
    key = (mode, cfg["optune"]["rho"] if mode == "optune" else 0.0,
           selection if mode == "optune" else "", cfg["optune"]["reference"])
    return dict(path=path, key=key, seed=cfg["run"]["seed"], initial=records[0],
                iters=[r for r in records if r["iteration"] >= 0])


def group(runs: list[dict]) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for r in runs:
        groups[r["key"]].append(r)
    order = {"optune": 0, "hypo": 1, "offline": 2}
    return dict(sorted(groups.items(), key=lambda kv: (order[kv[0][0]], -kv[0][1], kv[0][2:])))


def label(key, references: set[str] = frozenset({"behavior"})) -> str:
    mode, rho, selection, reference = key
    name = {"offline": "offline DPO", "hypo": "HyPO"}.get(mode)
    if name is None:
        name = f"ρ={rho:g}" if selection == "reward" else f"Rdm ρ={rho:g}"
    if len(references) == 1:
        return name
    return f"{name}, ref π_{'t' if reference == 'behavior' else '0'}"


def curves(runs: list[dict], metric: str) -> np.ndarray:
    """[seeds, iterations + 1]: the metric before training, then after each iteration."""
    return np.array([[r["initial"][metric]] + [i[metric] for i in r["iters"]] for r in runs])


def cumulative(runs: list[dict], total: str) -> np.ndarray:
    """[seeds, iterations + 1] running total of a cost (0 before the first iteration)."""
    return np.array([[0.0] + [i[f"total.{total}"] for i in r["iters"]] for r in runs])


def phase_split(runs: list[dict]) -> dict[str, float]:
    totals = {p: sum(i[f"seconds.{p}"] for r in runs for i in r["iters"][1:] or r["iters"])
              for p in PHASES}
    whole = sum(totals.values()) or 1.0
    return {p: 100.0 * v / whole for p, v in totals.items()}


def _labels(groups) -> dict:
    references = {key[3] for key in groups}
    return {key: label(key, references) for key in groups}


def plot(groups, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files, names = [], _labels(groups)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for key, runs in groups.items():
        ls = "--" if key[2] == "random" or key[0] != "optune" else "-"
        r = curves(runs, "eval.reward")
        x = np.arange(-1, r.shape[1] - 1)
        axes[0].plot(x, r.mean(0), ls, marker="o", label=names[key])
        axes[0].fill_between(x, r.min(0), r.max(0), alpha=0.15)
        for ax, cost in zip(axes[1:], ("generation_seconds", "tokens_generated"), strict=True):
            ax.plot(cumulative(runs, cost).mean(0), r.mean(0), ls, marker="o", label=names[key])
    axes[0].set(xlabel="iteration (-1: initial policy)", ylabel="held-out reward",
                title="held-out reward by iteration (mean, min-max over seeds)")
    axes[1].set(xlabel="cumulative generation seconds", ylabel="held-out reward",
                title="quality against generation time")
    axes[2].set(xlabel="cumulative tokens generated", ylabel="held-out reward",
                title="quality against generated tokens (load-independent)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward.png", dpi=120)
    files.append("reward.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ["paper (Table 1)"] + [names[k] for k in groups]
    splits = [{**PAPER_SPLIT, "reference": 0.0}] + [phase_split(r) for r in groups.values()]
    left = np.zeros(len(bars))
    for phase in PHASES:
        vals = np.array([s.get(phase, 0.0) for s in splits])
        ax.barh(bars, vals, left=left, label=phase)
        left += vals
    ax.set(xlabel="% of iteration time (iterations after the first)", title="time per phase")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "phases.png", dpi=120)
    files.append("phases.png")
    if frontier(groups, out / "frontier.png"):
        files.append("frontier.png")
    return files


def frontier_points(run: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(KL to π_0 per token, held-out reward) before training and after each iteration."""
    records = [run["initial"], *run["iters"]]
    if any(r.get("eval.kl_initial") is None for r in records):
        return None
    return (np.array([r["eval.kl_initial"] for r in records]),
            np.array([r["eval.reward"] for r in records]))


def frontier(groups, path: Path) -> bool:
    """The reward–KL frontier plot; False (nothing drawn) when no run measured drift."""
    import matplotlib.pyplot as plt

    names, drawn = _labels(groups), False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, runs in groups.items():
        for run in runs:
            points = frontier_points(run)
            if points is None:
                continue
            seed = f", seed {run['seed']}" if len(runs) > 1 else ""
            ax.plot(*points, marker="o", label=f"{names[key]}{seed}")
            ax.annotate("π_0", (points[0][0], points[1][0]), fontsize=7)
            drawn = True
    if drawn:
        ax.set(xlabel="KL(π_t ‖ π_0) per token, nats (held-out samples)",
               ylabel="held-out reward", title="reward–KL frontier (one point per iteration)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def table(groups) -> str:
    names = _labels(groups)
    full = next((runs for key, runs in groups.items() if key[:2] == ("optune", 1.0)), None)
    full_secs = np.mean([sum(sum(i[f"seconds.{p}"] for p in PHASES) for i in r["iters"])
                         for r in full]) if full else None
    lines = ["| variant | seeds | held-out reward: initial → final (mean ± sd) | win score | "
             "prompts regenerated | tokens generated | generation s | iteration s | "
             "speed-up vs ρ=1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    drift = all(frontier_points(r) is not None for runs in groups.values() for r in runs)
    if drift:  # the final policy's distance from π_0 (eval.drift)
        lines[0] += " KL to π_0 | NLL under π_0 (greedy): initial → final | EOS rate |"
        lines[1] += " --- | --- | --- |"
    for key, runs in groups.items():
        final = curves(runs, "eval.reward")[:, -1]
        init = curves(runs, "eval.reward")[:, 0].mean()
        win = np.mean([r["iters"][-1]["eval.win_score"] for r in runs])
        regen = np.mean([r["iters"][-1]["total.prompts_regenerated"] for r in runs])
        gen = np.mean([r["iters"][-1]["total.generation_seconds"] for r in runs])
        tokens = np.mean([r["iters"][-1]["total.tokens_generated"] for r in runs])
        secs = np.mean([sum(sum(i[f"seconds.{p}"] for p in PHASES) for i in r["iters"])
                        for r in runs])
        speed = f"{full_secs / secs:.2f}×" if full_secs else "n/a"
        lines.append(f"| {names[key]} | {len(runs)} | {init:.4f} → {final.mean():.4f} ± "
                     f"{final.std():.4f} | {win:.1f} | {regen:.0f} | {tokens:.0f} | {gen:.1f} | "
                     f"{secs:.1f} | {speed} |")
        if drift:
            nll = curves(runs, "eval.nll_initial")
            lines[-1] += (f" {curves(runs, 'eval.kl_initial')[:, -1].mean():.3f} |"
                          f" {nll[:, 0].mean():.2f} → {nll[:, -1].mean():.2f} |"
                          f" {curves(runs, 'eval.eos_rate')[:, -1].mean():.0%} |")
    split = ["", "| phase | paper Table 1 | " + " | ".join(names[k] for k in groups) + " |",
             "| --- | --- | " + " | ".join("---" for _ in groups) + " |"]
    for phase in PHASES:
        ours = " | ".join(f"{phase_split(r)[phase]:.1f}%" for r in groups.values())
        paper = f"{PAPER_SPLIT[phase]:.1f}%" if phase in PAPER_SPLIT else "(in training)"
        split.append(f"| {phase} | {paper} | {ours} |")
    return "\n".join(lines + split)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m optune_jax.report", description=__doc__)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
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
    args.out.mkdir(parents=True, exist_ok=True)
    groups = group(runs)
    files = plot(groups, args.out)
    text = table(groups)
    body = text + "\n\n" + "\n".join(f"![{f}]({f})" for f in files) + "\n"
    (args.out / "report.md").write_text(body)
    print(text)
    print(f"wrote {', '.join(files)} and report.md to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

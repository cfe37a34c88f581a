"""The figures of a study (`report` writes them): held-out reward by iteration and against
generation cost (the OPTune paper's Fig. 3 and 5), the time split per phase (its Table 1), the
reward–KL frontier with intervals (the DPO paper's Fig. 2) and where the gain comes from (the
OPTune paper's Fig. 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optune_jax.study import stats


def _dashed(g: stats.Group) -> bool:
    return (g.config.get("optune.selection") == "random"
            or g.config.get("run.mode", "optune") != "optune")


def plot(groups, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for g in groups:
        ls = "--" if _dashed(g) else "-"
        r = stats.curves(g.runs, "eval.reward")
        x = np.arange(-1, r.shape[1] - 1)
        axes[0].plot(x, r.mean(0), ls, marker="o", label=g.label)
        axes[0].fill_between(x, r.min(0), r.max(0), alpha=0.15)
        for ax, cost in zip(axes[1:], ("generation_seconds", "tokens_generated"), strict=True):
            ax.plot(stats.cumulative(g.runs, cost).mean(0), r.mean(0), ls, marker="o",
                    label=g.label)
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
    bars = ["paper (Table 1)"] + [g.label for g in groups]
    splits = [{**stats.PAPER_SPLIT, "reference": 0.0}] + [stats.phase_split(g.runs) for g in groups]
    left = np.zeros(len(bars))
    for phase in stats.PHASES:
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
    if fig2(groups, out / "fig2.png"):
        files.append("fig2.png")
    return files


def frontier(groups, path: Path) -> bool:
    """The reward–KL frontier: per group, π_0 then each iteration at the mean over its seeds of
    KL(π_t‖π_0) per token and held-out reward, with 95 % Student-t intervals on both axes (a
    group of one run: its points). False (nothing drawn) when no run measured drift."""
    import matplotlib.pyplot as plt

    drawn = False
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for g in groups:
        points = [stats.frontier_points(r) for r in g.runs]
        if not points or any(p is None for p in points):
            continue
        q = min(len(p[0]) for p in points)
        moments = [[stats.mean_ci(np.array([p[axis][i] for p in points]))[:2] for i in range(q)]
                 for axis in (0, 1)]
        (kl, kl_half), (reward, reward_half) = (np.array(s).T for s in moments)
        several = len(points) > 1
        ax.errorbar(kl, reward, xerr=kl_half if several else None,
                    yerr=reward_half if several else None, marker="o", capsize=3,
                    ls="--" if _dashed(g) else "-", label=f"{g.label} ({len(points)} seeds)")
        if not drawn:
            ax.annotate("π_0", (kl[0], reward[0]), textcoords="offset points", xytext=(4, -10))
        drawn = True
    if drawn:
        ax.set(xlabel="KL(π_t ‖ π_0) per token, nats (held-out samples)",
               ylabel="held-out reward",
               title="reward–KL frontier: π_0, then one point per iteration (± 95 % CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def fig2(groups: list[stats.Group], path: Path) -> bool:
    """The OPTune paper's Fig. 2 per group: bars of the bottom and the top half's share of the
    reward gain at each iteration, averaged over seeds; False when no run has a history."""
    import matplotlib.pyplot as plt

    drawn = [(g, s) for g in groups if (s := stats.gain_split(g.runs)) is not None]
    if not drawn:
        return False
    cols = min(3, len(drawn))
    rows = -(-len(drawn) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
    for ax, (g, s) in zip(axes.flat, drawn, strict=False):
        x = s["iteration"]
        ax.bar(x - 0.2, 100 * s["share_bottom"], 0.4, label="bottom 50 %")
        ax.bar(x + 0.2, 100 * s["share_top"], 0.4, label="top 50 %")
        ax.axhline(50, color="grey", lw=0.8, ls=":")
        ax.set(title=f"{g.label} ({s['seeds']} seeds)", xlabel="iteration t", xticks=x,
               ylabel="% of the reward gain from t-1")
        ax.legend(fontsize=8)
    for ax in axes.flat[len(drawn):]:
        ax.set_visible(False)
    fig.suptitle("where the reward gain comes from: prompts ranked by chosen reward at t-1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

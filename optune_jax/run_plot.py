"""`run_plot.png` of a run directory: held-out reward (with the paired gain's 95 % interval) and
drift from π_0 (KL per token, NLL of greedy answers) per iteration, from its metrics records."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FILE = "run_plot.png"


def plot_run(records: list[dict], out: Path) -> Path:
    """Draws the run's curves into `out/run_plot.png` (written beside it, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = sorted(records, key=lambda r: r["iteration"])
    x = np.array([r["iteration"] for r in recs])
    reward = np.array([r["eval.reward"] for r in recs])
    half = np.array([r.get("eval.reward_gain_ci95", 0.0) for r in recs])
    drift = "eval.kl_initial" in recs[-1]
    fig, axes = plt.subplots(1, 2 if drift else 1, figsize=(11 if drift else 5.5, 4),
                             squeeze=False)
    ax = axes[0, 0]
    ax.errorbar(x, reward, yerr=half, marker="o", capsize=4, label="held-out reward")
    ax.axhline(reward[0], color="grey", lw=0.8, ls=":", label="initial policy π_0")
    ax.set(xlabel="iteration (-1: π_0)", ylabel="held-out reward", xticks=x,
           title="held-out reward (bars: paired 95 % interval of the gain)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if drift:
        ax = axes[0, 1]
        kl = [r["eval.kl_initial"] for r in recs]
        ax.plot(x, kl, marker="o", label="KL(π_t ‖ π_0) per token")
        nll = np.array([r["eval.nll_initial"] for r in recs])
        ax.plot(x, nll - nll[0], marker="s", label="NLL under π_0 of greedy answers, − π_0's")
        ax.set(xlabel="iteration (-1: π_0)", ylabel="nats per token", xticks=x,
               title="drift from the initial policy")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path, tmp = out / FILE, out / (FILE + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path

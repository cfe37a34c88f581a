"""Per-prompt reward history (issue 17) and the OPTune paper's Fig. 2 split of the reward gain.

`record(pool, t)` is one line of `prompt_rewards.jsonl` (FILE), written by the loop after each
iteration t through a `MetricsLog`, so a resume keeps it consistent with the checkpoints as it
does metrics.jsonl: for every training prompt, in the run's prompt order, whether its pair was
regenerated at t (1) or kept (0), and the pair's chosen (max) and rejected (min) reward.

`gain_split` is the analysis of the paper's §3.1 / Fig. 2: at each iteration t ≥ 1 the prompts
are split in halves by their chosen reward at the end of t - 1 (the ranking OPTune selects by)
and the total reward gain from t - 1 to t is attributed to the bottom and the top half.
"""

from __future__ import annotations

import numpy as np

FILE = "prompt_rewards.jsonl"


def _floats(x_P: np.ndarray) -> list[float]:
    # the shortest decimal that reads back as the same float32 ("0.3", not 0.30000001192...)
    return [float(str(v)) for v in np.asarray(x_P, np.float32)]


def record(pool, t: int) -> dict:
    """The history line of iteration `t` from the pool D_t (a `selection.PromptPool`).

    Returns {"iteration": t, "regenerated": [P] 0/1, "chosen": [P], "rejected": [P]}; a reward
    of a prompt never generated is NaN (written as null).
    """
    rewards_P2 = np.asarray(pool.rewards_P2, np.float32)
    return {
        "iteration": t,
        "regenerated": (np.asarray(pool.iteration_P) == t).astype(int).tolist(),
        "chosen": _floats(rewards_P2.max(axis=1)),
        "rejected": _floats(rewards_P2.min(axis=1)),
    }


def arrays(records: list[dict]) -> dict[str, np.ndarray]:
    """History records (iterations 0..T-1, in order) as arrays: "chosen" and "rejected" [T, P]
    float64 (NaN for null), "regenerated" [T, P] bool, "iteration" [T]."""
    records = sorted(records, key=lambda r: r["iteration"])
    nan = lambda xs: [np.nan if x is None else x for x in xs]  # noqa: E731
    return {
        "iteration": np.array([r["iteration"] for r in records], np.int64),
        "chosen": np.array([nan(r["chosen"]) for r in records], np.float64),
        "rejected": np.array([nan(r["rejected"]) for r in records], np.float64),
        "regenerated": np.array([r["regenerated"] for r in records], bool),
    }


def bottom_weights(keys_P: np.ndarray) -> np.ndarray:
    """[P] weight in [0, 1] of each prompt's membership of the bottom half: the ceil(P / 2)
    lowest keys (OPTune's selection at ρ = 0.5). Prompts tied across the boundary share the
    remaining places equally (the mean over every order of breaking the tie), so the split
    never depends on the prompts' input order."""
    keys_P = np.asarray(keys_P, np.float64)
    n = -(-keys_P.shape[0] // 2)
    boundary = np.sort(keys_P)[n - 1]
    below, tied = keys_P < boundary, keys_P == boundary
    w_P = below.astype(np.float64)
    w_P[tied] = (n - below.sum()) / tied.sum()
    return w_P


def gain_split(chosen_TP: np.ndarray) -> dict[str, np.ndarray]:
    """Fig. 2 of the OPTune paper from the chosen rewards [T, P] after iterations 0..T-1.

    Returns arrays [T - 1], one entry per iteration t = 1..T-1 ("iteration"):
      share_bottom, share_top: fraction of the total gain sum_p (chosen_t - chosen_{t-1}) from
        the bottom / top half of the ranking at t - 1 (they sum to 1; NaN when the total is 0;
        outside [0, 1] when the halves' gains have opposite signs);
      mean_gain_bottom, mean_gain_top: the mean per-prompt gain within each half;
      total_gain: the summed gain.
    """
    chosen_TP = np.asarray(chosen_TP, np.float64)
    prev_QP, gain_QP = chosen_TP[:-1], np.diff(chosen_TP, axis=0)
    w_QP = np.stack([bottom_weights(k) for k in prev_QP]) if len(prev_QP) else prev_QP
    size_bottom = w_QP.sum(axis=1)
    size_top = chosen_TP.shape[1] - size_bottom
    bottom_Q = (w_QP * gain_QP).sum(axis=1)
    total_Q = gain_QP.sum(axis=1)
    top_Q = total_Q - bottom_Q
    with np.errstate(divide="ignore", invalid="ignore"):
        safe_Q = np.where(total_Q == 0, np.nan, total_Q)
        return {
            "iteration": np.arange(1, chosen_TP.shape[0]),
            "share_bottom": bottom_Q / safe_Q,
            "share_top": top_Q / safe_Q,
            "mean_gain_bottom": bottom_Q / size_bottom,
            "mean_gain_top": top_Q / size_top,
            "total_gain": total_Q,
        }

"""Drift of the tuned policy π_t from the initial policy π_0, per response token (host NumPy).

    kl = kl_per_token(logp_t_N, logp_0_N, tokens_N)   # exact samples of π_t
    nll = nll_per_token(logp_0_N, tokens_N)           # π_t's greedy answers, scored by π_0
    rep = seq_rep_n(token_lists, n=4)                 # repetition loops, which π_0 finds likely

Sequence logps are sums over a response's tokens (EOS included), as `response_logps` returns
them with `average_logps=False`; `tokens_N` counts those tokens.
"""

from __future__ import annotations

import numpy as np


def _check(tokens_N: np.ndarray, *logps_N: np.ndarray) -> np.ndarray:
    tokens_N = np.asarray(tokens_N)
    for x in logps_N:
        if np.shape(x) != tokens_N.shape or tokens_N.ndim != 1:
            raise ValueError(
                f"drift: logps of shape {np.shape(x)} for token counts of shape {tokens_N.shape}; "
                "expected matching 1-D arrays"
            )
    if np.any(tokens_N < 0):
        raise ValueError("drift: token counts must be >= 0")
    return tokens_N


def kl_per_token(logp_policy_N, logp_initial_N, tokens_N) -> float:
    """Σ_n (log π_t(y_n) − log π_0(y_n)) / Σ_n |y_n| over exact samples y_n ~ π_t.

    The sequence KL's Monte-Carlo estimate (Schulman's k1, TRL's `objective/kl`) spread over the
    tokens: unbiased only when y_n are drawn from π_t itself (temperature 1, no truncation).
    """
    tokens_N = _check(tokens_N, logp_policy_N, logp_initial_N)
    total = np.sum(tokens_N)
    diff = np.asarray(logp_policy_N, np.float64) - np.asarray(logp_initial_N, np.float64)
    return float(np.sum(diff) / total) if total else 0.0


def nll_per_token(logp_initial_N, tokens_N) -> float:
    """−Σ_n log π_0(y_n) / Σ_n |y_n|: how unlikely the answers y_n are under π_0, in nats/token."""
    tokens_N = _check(tokens_N, logp_initial_N)
    total = np.sum(tokens_N)
    return float(-np.sum(np.asarray(logp_initial_N, np.float64)) / total) if total else 0.0


def seq_rep_n(sequences, n: int = 4) -> float:
    """Mean over sequences of 1 − |unique n-grams| / |n-grams| (seq-rep-n, Welleck et al. 2019).

    0 for text without a repeated n-gram, near 1 for a loop such as `* **` lines; sequences with
    fewer than n tokens count as 0. A loop is likely under π_0 once it starts, so NLL under π_0
    alone does not flag it.
    """
    if n < 1:
        raise ValueError(f"seq_rep_n: n={n} must be >= 1")
    scores = []
    for seq in sequences:
        seq = [int(x) for x in seq]
        grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
        scores.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return float(np.mean(scores)) if scores else 0.0

"""The per-prompt reward history line and the Fig. 2 split of the reward gain (brute force)."""

import itertools
import json

import numpy as np
import pytest

from optune_jax import reward_history
from optune_jax.run.metrics_log import MetricsLog
from optune_jax.selection import PromptPool


def test_record_marks_regenerated_prompts_and_reads_back(tmp_path):
    rewards_P2 = np.float32([[0.1, 0.3], [0.7, 0.2], [0.5, 0.5]])
    pool = PromptPool(np.zeros((3, 2, 4), np.int32), np.ones((3, 2), np.int32), rewards_P2,
                      np.int32([2, 1, 2]))
    line = reward_history.record(pool, 2)
    assert line == {"iteration": 2, "regenerated": [1, 0, 1], "chosen": [0.3, 0.7, 0.5],
                    "rejected": [0.1, 0.2, 0.5]}  # the float32 values' shortest decimals
    log = MetricsLog(tmp_path, name=reward_history.FILE, tensorboard=False)
    log.write(reward_history.record(pool, 0))
    log.write(line)
    log.close()
    assert not (tmp_path / "tensorboard").exists()
    got = reward_history.arrays([json.loads(x) for x in log.path.read_text().splitlines()])
    np.testing.assert_array_equal(got["chosen"][1].astype(np.float32), rewards_P2.max(1))
    np.testing.assert_array_equal(got["regenerated"], [[0, 0, 0], [1, 0, 1]])
    # resumed from checkpoint 0: later lines are dropped, as in metrics.jsonl
    MetricsLog(tmp_path, resume_after=0, name=reward_history.FILE, tensorboard=False).close()
    assert [json.loads(x)["iteration"] for x in log.path.read_text().splitlines()] == [0]


def _brute_force(chosen_TP):
    """Every order of the prompts, split by a stable sort, averaged: ties shared fairly."""
    t_count, p = chosen_TP.shape
    out = {k: [] for k in ("share_bottom", "mean_gain_bottom", "mean_gain_top")}
    for t in range(1, t_count):
        prev, gain = chosen_TP[t - 1], chosen_TP[t] - chosen_TP[t - 1]
        bottom_sums = []
        for perm in itertools.permutations(range(p)):
            ranked = sorted(perm, key=lambda i: prev[i])  # stable: ties in `perm` order
            bottom_sums.append(sum(gain[i] for i in ranked[: (p + 1) // 2]))
        bottom = np.mean(bottom_sums)
        out["share_bottom"].append(bottom / gain.sum())
        out["mean_gain_bottom"].append(bottom / ((p + 1) // 2))
        out["mean_gain_top"].append((gain.sum() - bottom) / (p - (p + 1) // 2))
    return out


@pytest.mark.parametrize("p", [5, 6])
def test_gain_split_matches_brute_force_with_ties(p):
    rng = np.random.default_rng(p)
    chosen_TP = rng.integers(0, 4, size=(4, p)) / 4.0  # few values: many ties
    chosen_TP[1:] += 0.05  # a non-zero total gain
    got = reward_history.gain_split(chosen_TP)
    want = _brute_force(chosen_TP)
    np.testing.assert_array_equal(got["iteration"], [1, 2, 3])
    for key, values in want.items():
        np.testing.assert_allclose(got[key], values, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["share_bottom"] + got["share_top"], 1.0)
    np.testing.assert_allclose(got["total_gain"], np.diff(chosen_TP, axis=0).sum(1))


def test_gain_split_without_ties_and_without_gain():
    # the bottom half (prompts 0, 1 at t=0) gains 0.3 of a total 0.4
    chosen = np.array([[0.1, 0.2, 0.8, 0.9], [0.3, 0.3, 0.9, 0.9]])
    s = reward_history.gain_split(chosen)
    np.testing.assert_allclose([s["share_bottom"][0], s["share_top"][0]], [0.75, 0.25])
    np.testing.assert_allclose([s["mean_gain_bottom"][0], s["mean_gain_top"][0]], [0.15, 0.05])
    flat = reward_history.gain_split(np.ones((2, 4)))
    assert np.isnan(flat["share_bottom"][0]) and flat["mean_gain_top"][0] == 0.0

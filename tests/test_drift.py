"""Drift from π_0: the per-token estimators against hand values, and the evaluation's KL of
π_0 against itself (sampler logps vs forward logps) at zero."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from optune_jax import drift, evaluate, train
from optune_jax.loop import OptuneRun

from .test_loop import ONE_DEVICE, micro_config


def test_kl_and_nll_per_token_by_hand():
    logp_t, logp_0, tokens = np.array([-3.0, -1.0]), np.array([-5.0, -2.0]), np.array([4, 1])
    assert drift.kl_per_token(logp_t, logp_0, tokens) == pytest.approx((2.0 + 1.0) / 5)
    assert drift.nll_per_token(logp_0, tokens) == pytest.approx(7.0 / 5)
    assert drift.kl_per_token(np.zeros(0), np.zeros(0), np.zeros(0, int)) == 0.0


@given(st.lists(st.tuples(st.floats(-50, 0), st.integers(1, 64)), min_size=1, max_size=8))
def test_a_policy_has_no_drift_from_itself(rows):
    logps, tokens = map(np.array, zip(*rows, strict=True))
    assert drift.kl_per_token(logps, logps, tokens) == 0.0
    assert drift.nll_per_token(logps, tokens) >= 0.0


def test_seq_rep_n_by_hand():
    assert drift.seq_rep_n([[1, 2, 3, 4, 5]], n=4) == 0.0  # 2 distinct 4-grams of 2
    loop = [7, 8] * 10  # `* **` lines: 17 4-grams, 2 distinct
    assert drift.seq_rep_n([loop, [1, 2]], n=4) == pytest.approx((1 - 2 / 17 + 0.0) / 2)
    assert drift.seq_rep_n([], n=4) == 0.0
    with pytest.raises(ValueError, match="n=0 must be >= 1"):
        drift.seq_rep_n([[1]], n=0)


def test_mismatched_shapes_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"shape \(3,\) for token counts of shape \(2,\)"):
        drift.kl_per_token(np.zeros(3), np.zeros(3), np.ones(2, int))
    with pytest.raises(ValueError, match="token counts must be >= 0"):
        drift.nll_per_token(np.zeros(2), np.array([1, -1]))


@pytest.mark.parametrize("top_p", [1.0])  # exact samples reused (drawn apart: test_evaluate.py)
def test_evaluation_of_pi0_against_itself_has_zero_kl(tmp_path, top_p):
    """The sampler's logps of π_0's own samples and π_0's forward pass agree token for token,
    so KL(π_0‖π_0) comes out 0 (which draws the KL samples: tests/test_evaluate.py)."""
    run = OptuneRun(
        micro_config(tmp_path, "eval.drift=true", f"sampling.top_p={top_p}", ONE_DEVICE),
        progress=False,
    )
    rewards, record = run.evaluator(run.policy_params())  # not `initial`: measured, not set to 0
    run.close()
    assert abs(record["eval.kl_initial"]) < 1e-4, record
    assert record["eval.nll_initial"] > 0 and 0 <= record["eval.greedy_eos_rate"] <= 1
    assert 0 <= record["eval.greedy_rep4"] <= 1
    assert record["eval.reward"] == pytest.approx(float(np.mean(rewards)))
    assert [e["prompt"] for e in record["eval.examples"]] == [
        r["prompt"] for r in run.eval_prompts.rows[:3]
    ]


def test_summary_shows_drift_and_answers_side_by_side():
    def record(it, kl, answer):
        return {
            "iteration": it, "eval.reward": 0.2 + it / 10, "eval.win_score": 60.0,
            "eval.kl_initial": kl, "eval.nll_initial": 0.7 + kl, "eval.greedy_eos_rate": 0.5,
            "eval.greedy_tokens": 30.0, "eval.greedy_rep4": 0.5, "eval.eos_rate": 0.25,
            "eval.response_tokens": 40.0,
            "eval.examples": [{"prompt": "Say hi.", "answer": answer}],
            "prompts_regenerated": 4, "total.prompts_regenerated": 6,
            "total.tokens_generated": 100, "total.generation_seconds": 1.0,
        }

    last = {**record(0, 0.25, "a | b\nc"), "eval.reward_gain_ci95": 0.0712}
    text = train.summary_table([record(-1, 0.0, "Hi there."), last])
    assert "| held-out reward gain, paired (95 % interval) |  | +0.100 ± 0.071 |" in text
    assert "| KL(π_t ‖ π_0) per token, on samples | 0.000 | 0.250 |" in text
    assert "| NLL under π_0 of greedy answers, nats/token | 0.700 | 0.950 |" in text
    assert "| samples ending with EOS | 25% | 25% |" in text
    assert "| repeated 4-grams in greedy answers (seq-rep-4) | 0.500 | 0.500 |" in text
    assert "**Say hi.**" in text and "| Hi there. | a \\| b<br>c |" in text


def test_mean_ci95_is_the_normal_interval_of_the_mean():
    x = np.array([0.1, 0.4, 0.2, 0.9, 0.0])
    mean = sum(x) / 5
    sd = (sum((v - mean) ** 2 for v in x) / 4) ** 0.5  # sample standard deviation, by hand
    assert evaluate.mean_ci95(x) == pytest.approx(1.96 * sd / 5**0.5)
    assert evaluate.mean_ci95(np.zeros(48)) == 0.0
    assert np.isnan(evaluate.mean_ci95(np.array([0.3])))

"""The reward interface: registry, output checks and the tiny smoke reward."""

import numpy as np
import pytest

from optune_jax import rewards

ROWS = [{"constraints": [{"type": "lowercase"}]}, {"constraints": [{"type": "no_commas"}]}]


def test_registry_and_unknown_names():
    assert rewards.get_reward("tiny") is rewards.tiny_reward
    scores = rewards.get_reward("ifeval")(ROWS, ["all fine", "a, b"])
    assert scores.dtype == np.float32 and scores[0] == 1.0
    with pytest.raises(ValueError, match=r"'rm'.*\['ifeval', 'tiny'\]") as info:
        rewards.get_reward("rm")
    assert "\n" not in str(info.value)


def test_score_checks_and_returns_float32():
    scores = rewards.score("ifeval", ROWS, ["Not lowercase", "no commas"])
    assert scores.dtype == np.float32 and scores.shape == (2,)
    assert scores[0] < 0.1 and scores[1] == 1.0
    with pytest.raises(rewards.RewardError, match="2 rows but 1 responses"):
        rewards.score("tiny", ROWS, ["x"])


@pytest.mark.parametrize(
    "scores, n, match",
    [
        ([0.1, float("nan"), 0.3], 3, r"reward 'r': score nan for prompt index 1 is not finite"),
        ([0.1, 0.2, -np.inf], 3, r"prompt index 2 is not finite"),
        (np.array([1e300, 0.0]), 2, r"prompt index 0 is not finite"),  # overflows float32
        ([0.1, 0.2], 3, r"expected 3 scores of shape \(3,\), got \(2,\)"),
        ([[0.1, 0.2]], 2, r"got \(1, 2\)"),
        (0.5, 1, r"got \(\)"),
        (["a", "b"], 2, r"do not cast to float32"),
        ([0.1, None], 2, r"do not cast to float32"),
        ([object()], 1, r"do not cast to float32"),
    ],
)
def test_check_rewards_rejects_bad_scores(scores, n, match):
    with pytest.raises(rewards.RewardError, match=match) as info:
        rewards.check_rewards("r", scores, n)
    assert "\n" not in str(info.value)


def test_check_rewards_accepts_ints_and_float64():
    out = rewards.check_rewards("r", np.array([1, 2], np.int64), 2)
    assert out.dtype == np.float32 and out.tolist() == [1.0, 2.0]
    assert rewards.check_rewards("r", [], 0).shape == (0,)


def test_tiny_reward_values():
    scores = rewards.tiny_reward([{}] * 5, ["", "aeiou", "xyz", "AEIOU ae", "été a"])
    np.testing.assert_allclose(scores, [0.0, 1.0, 0.0, 0.25, 0.2])
    assert scores.dtype == np.float32


def _random_vocab(rng, size=300):
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?0123456789")
    return ["".join(rng.choice(alphabet, rng.integers(1, 7))) for _ in range(size)]


def test_tiny_reward_spreads_and_is_learnable_by_a_unigram_policy():
    """Online DPO on a unigram policy (the part of a random tiny LM that a bias can move).

    Iterations follow SPEC §4 with rho = 1: sample two responses per prompt, score with
    tiny_reward, drop ties, take DPO steps against the behavior policy (SPEC §3).
    """
    rng = np.random.default_rng(0)
    vocab = np.array(_random_vocab(rng))
    logits_V = np.zeros(len(vocab))
    num_prompts, length, beta, lr = 64, 24, 0.5, 8.0
    means = []
    for _ in range(4):
        probs_V = np.exp(logits_V - logits_V.max())
        probs_V /= probs_V.sum()
        ids_P2T = rng.choice(len(vocab), size=(num_prompts, 2, length), p=probs_V)
        texts = ["".join(vocab[ids]) for ids in ids_P2T.reshape(-1, length)]
        r_P2 = rewards.tiny_reward([{}] * len(texts), texts).reshape(num_prompts, 2)
        means.append(float(r_P2.mean()))
        keep = r_P2[:, 0] != r_P2[:, 1]
        assert keep.mean() > 0.95  # random samples rarely tie
        winner = (r_P2[:, 1] > r_P2[:, 0]).astype(int)[keep]
        counts_P2V = np.stack(
            [np.bincount(ids, minlength=len(vocab)) for ids in ids_P2T.reshape(-1, length)]
        ).reshape(num_prompts, 2, -1)[keep]
        diff_KV = (
            counts_P2V[np.arange(len(winner)), winner]
            - counts_P2V[np.arange(len(winner)), 1 - winner]
        )
        ref_logp_V = np.log(probs_V)
        for _ in range(10):
            logp_V = logits_V - np.log(np.exp(logits_V - logits_V.max()).sum()) - logits_V.max()
            h_K = beta * (diff_KV @ (logp_V - ref_logp_V))  # equal lengths: the normaliser cancels
            # d/dlogits of -log sigmoid(h); the softmax terms cancel for the same reason.
            grad_V = -((1 - 1 / (1 + np.exp(-h_K)))[:, None] * beta * diff_KV).mean(axis=0)
            logits_V -= lr * grad_V
    assert means[-1] > 1.5 * means[0] and means == sorted(means), means

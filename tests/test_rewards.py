"""The reward interface: built-ins, user callables, weighted sums, output checks, the tiny and
sentiment rewards."""

import sys
import textwrap

import numpy as np
import pytest

from optune_jax.rewards import functions as rewards
from optune_jax.run.schema import RewardComponent, RewardSection

ROWS = [{"constraints": [{"type": "lowercase"}]}, {"constraints": [{"type": "no_commas"}]}]


def test_registry_and_unknown_names():
    assert rewards.get_reward("tiny") is rewards.tiny_reward
    scores = rewards.get_reward("ifeval")(ROWS, ["all fine", "a, b"])
    assert scores.dtype == np.float32 and scores[0] == 1.0
    assert rewards.get_reward("sentiment") is rewards.sentiment_reward
    known = r"'rm'.*\['ifeval', 'sentiment', 'tiny'\].*package.module:function"
    with pytest.raises(ValueError, match=known) as info:
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
        ([0.1, float("nan"), 0.3], 3, r"reward 'r': score nan for response 1 is not finite$"),
        ([0.1, 0.2, -np.inf], 3, r"response 2 is not finite"),
        (np.array([1e300, 0.0]), 2, r"response 0 is not finite"),  # overflows float32
        ([0.1, 0.2], 3, r"expected 3 scores of shape \(3,\), one per response, got \(2,\)"),
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

    Iterations follow design §4 with rho = 1: sample two responses per prompt, score with
    tiny_reward, drop ties, take DPO steps against the current policy π_t (design §3).
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


def test_sentiment_reward_on_fixed_texts():
    """VADER's compound scores (vaderSentiment 3.3.2), -1 for a response without a word."""
    texts = ["A traffic jam is a frustrating experience.", "What a lovely, sunny morning!",
             "The bus arrives at nine.", "", "  !!! ", "I love love love it!!!"]
    scores = rewards.sentiment_reward([{}] * len(texts), texts)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, [-0.4404, 0.784, 0.0, -1.0, -1.0, 0.938], atol=1e-4)
    # the compound score is x / sqrt(x² + 15) of the summed valences: "frustrating" is -1.9
    np.testing.assert_allclose(scores[0], -1.9 / np.sqrt(1.9**2 + 15), atol=1e-4)
    # the games it allows: more '!' and repeated praise score higher than a plain sentence
    assert scores[5] > rewards.sentiment_reward([{}], ["I love it."])[0]


USER_MODULE = """
import numpy as np

def brevity(rows, responses):
    return np.array([-len(r.split()) / 10 for r in responses])

def nan_on_rain(rows, responses):
    return [float("nan") if "rain" in r else 1.0 for r in responses]

def raises_on_rain(rows, responses):
    if any("rain" in r for r in responses):
        raise KeyError("rain")
    return [1.0] * len(responses)

def one_score(rows, responses):
    return [1.0]

def words(rows, responses):
    return ["many"] * len(responses)

class Scorers:
    @staticmethod
    def length(rows, responses):
        return [len(r) for r in responses]

NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "broken_rewards.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # (also invalidates the import caches)
    for name in ("my_rewards", "broken_rewards"):  # another test's module of the same name
        monkeypatch.delitem(sys.modules, name, raising=False)
    return "my_rewards"


ROWS3 = [{"prompt": "Describe a traffic jam."}, {"prompt": "Describe a rainy Monday."},
         {"prompt": "Tell me about a queue."}]


def test_a_users_callable_is_imported_and_scored(user_module):
    fn = rewards.make_reward(RewardSection(name="my_rewards:brevity"))
    scores = rewards.score("my_rewards:brevity", ROWS3, ["one two", "one", ""], fn=fn)
    np.testing.assert_allclose(scores, [-0.2, -0.1, 0.0])
    assert scores.dtype == np.float32
    length = rewards.get_reward("my_rewards:Scorers.length")
    assert rewards.score("len", ROWS3[:1], ["abc"], fn=length).tolist() == [3.0]


@pytest.mark.parametrize(
    "name, match",
    [
        ("no_such_module_x:f", r"cannot import module 'no_such_module_x' \(ModuleNotFoundError: "),
        ("broken_rewards:f", r"cannot import module 'broken_rewards' \(ModuleNotFoundError: No "
                             r"module named 'not_a_module_anywhere'\)"),
        ("my_rewards:missing", r"'my_rewards' has no attribute 'missing'"),
        ("my_rewards:NOT_CALLABLE", r"is a int, not a callable \(rows, responses\) -> scores"),
        ("my_rewards:", r"expected package.module:function"),
        ("sentimnet", r"unknown reward 'sentimnet'"),
    ],
)
def test_a_reward_that_cannot_be_built_is_one_line(user_module, name, match):
    with pytest.raises(ValueError, match=match) as info:
        rewards.make_reward(RewardSection(name=name))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name, match",
    [
        ("my_rewards:nan_on_rain", r"^reward 'my_rewards:nan_on_rain': score nan for response 1 "
                                   r"is not finite \(prompt: 'Describe a rainy Monday.'\)$"),
        ("my_rewards:raises_on_rain",
         r"^reward 'my_rewards:raises_on_rain' raised KeyError: 'rain' on response 1 "
         r"\(prompt: 'Describe a rainy Monday.'\)$"),
        ("my_rewards:one_score",
         r"expected 3 scores of shape \(3,\), one per response, got \(1,\)"),
        ("my_rewards:words", r"scores do not cast to float32"),
    ],
)
def test_a_user_reward_that_fails_stops_in_one_line_naming_the_prompt(user_module, name, match):
    fn = rewards.make_reward(RewardSection(name=name))
    with pytest.raises(rewards.RewardError, match=match) as info:
        rewards.score(name, ROWS3, ["sunny", "rain again", "a queue"], fn=fn)
    assert "\n" not in str(info.value)


def test_weighted_sum_of_builtin_and_user_rewards(user_module):
    section = RewardSection(name="weighted", components=(
        RewardComponent(name="sentiment", weight=1.0),
        RewardComponent(name="my_rewards:brevity", weight=0.5),
        RewardComponent(name="my_rewards:brevity", weight=-2.0, label="length_bonus"),
    ))
    fn = rewards.make_reward(section)
    texts = ["What a lovely, sunny morning!", "The bus arrives at nine.", ""]
    total, parts = rewards.score_parts("weighted", ROWS3, texts, fn=fn)
    assert list(parts) == ["sentiment", "brevity", "length_bonus"]
    senti = rewards.sentiment_reward(ROWS3, texts)
    brevity = np.float32([-0.5, -0.5, 0.0])
    np.testing.assert_allclose(parts["sentiment"], senti)
    np.testing.assert_allclose(parts["brevity"], brevity)
    np.testing.assert_allclose(total, senti + 0.5 * brevity - 2.0 * brevity, rtol=1e-6)
    assert total.dtype == np.float32
    # a failing component is named by its label
    bad = rewards.make_reward(RewardSection(name="weighted", components=(
        RewardComponent(name="tiny"), RewardComponent(name="my_rewards:nan_on_rain", label="x"))))
    with pytest.raises(rewards.RewardError, match=r"^reward 'x': score nan for response 1"):
        rewards.score_parts("weighted", ROWS3, ["a", "rain", "b"], fn=bad)


@pytest.mark.parametrize(
    "section, match",
    [
        (RewardSection(name="weighted"), r"reward.name=weighted needs reward.components"),
        (RewardSection(name="sentiment", components=(RewardComponent(name="tiny"),)),
         r"reward.components is read only with reward.name=weighted, not 'sentiment'"),
        (RewardSection(name="weighted", components=(RewardComponent(name="tiny"),
                                                    RewardComponent(name="tiny"))),
         r"reward.components\[1\]: label 'tiny' is used twice"),
        (RewardSection(name="weighted", components=(RewardComponent(),)),
         r"reward.components\[0\].name is missing"),
        (RewardSection(name="weighted", components=(RewardComponent(name="weighted"),)),
         r"cannot be a component of itself"),
        (RewardSection(name="weighted", components=(RewardComponent(name="model"),)),
         r"reward.components\[0\].name=model needs reward.components\[0\].path"),
        (RewardSection(name="weighted", components=(RewardComponent(name="tiny", path="x"),)),
         r"reward.components\[0\].path is read only with reward.components\[0\].name=model, "
         r"not 'tiny'"),
        (RewardSection(name="weighted", components=(RewardComponent(name="nope:f"),)),
         r"cannot import module 'nope'"),
    ],
)
def test_a_weighted_reward_that_cannot_be_built_is_one_line(section, match):
    with pytest.raises(ValueError, match=match) as info:
        rewards.make_reward(section)
    assert "\n" not in str(info.value)


def test_weighted_components_load_from_yaml(tmp_path):
    from optune_jax.run.config_file import load_config
    from optune_jax.run.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("reward:\n  name: weighted\n  components:\n"
                    "    - {name: sentiment, weight: 1.0}\n"
                    "    - {name: my_rewards:brevity, weight: 0.25, label: short}\n")
    cfg = load_config(path)
    assert cfg.reward.components == (
        RewardComponent(name="sentiment", weight=1.0),
        RewardComponent(name="my_rewards:brevity", weight=0.25, label="short"),
    )
    path.write_text("reward:\n  name: weighted\n  components:\n    - {name: tiny, wieght: 2}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'reward.components\[0\].wieght'; did you "
                                          r"mean 'reward.components\[0\].weight'\?"):
        load_config(path)

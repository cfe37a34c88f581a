"""Scoring sampled responses: tokens decoded up to their lengths, rewarded with their row."""

import math

import numpy as np
import pytest

from models import load_tokenizer
from optune_jax.rewards.functions import Component, RewardError, WeightedReward, tiny_reward
from optune_jax.run.errors import RunError
from optune_jax.scoring import ResponseScorer, part_means

EOS = 2  # SmolLM2's <|im_end|>, a special token that decoding drops
ROWS = [{"question": "q0", "k": 0}, {"question": "q1", "k": 1}, {"question": "q2", "k": 2}]
# [N=3 prompts, S=2 samples]; the first fills the budget exactly (no EOS), "" is EOS alone
TEXTS = [["Hello world, this is fine.", "Yes!"], ["", " a b c"], ["rhythm? Sky.", "Oh well."]]
Y = 7  # token budget per response: the first text's 7 tokens, no room for EOS
FILLER = [55, 2285, 50, 14882, 1892, 3718]  # "GARBAGE zzz": text past a response's end


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2")  # cached: test_prompts.py shares it in one process


@pytest.fixture(scope="module")
def responses(tok):
    """tokens [N, S, Y] (EOS after each text that fits, filler after that) and lengths [N, S]."""
    n, s = len(TEXTS), len(TEXTS[0])
    tokens = np.zeros((n, s, Y), np.int32)
    lengths = np.zeros((n, s), np.int32)
    for i in range(n):
        for j in range(s):
            ids = [*tok(TEXTS[i][j], add_special_tokens=False)["input_ids"], EOS][:Y]
            tokens[i, j] = (ids + FILLER * Y)[:Y]
            lengths[i, j] = len(ids)
    assert lengths[0, 0] == Y and tokens[0, 0, -1] != EOS  # the boundary case is really there
    return tokens, lengths


def keyed(rows, texts):
    """A reward of both the row and the text: len(text) + 100 · row["k"]."""
    return np.asarray([len(t) + 100 * r["k"] for r, t in zip(rows, texts, strict=True)], np.float32)


def _reference(tok, fn, tokens, lengths):
    """[N, S] rewards from decoding each response alone and scoring it with its own row."""
    n, s = lengths.shape
    out = np.zeros((n, s), np.float32)
    for i in range(n):
        for j in range(s):
            text = tok.decode(tokens[i, j, : lengths[i, j]].tolist(), skip_special_tokens=True)
            out[i, j] = fn([ROWS[i]], [text])[0]
    return out


def test_decode_reads_each_response_up_to_its_length_prompt_major(tok, responses):
    """`decode`: the N·S texts, prompt-major, each cut at its length, special tokens dropped."""
    scorer = ResponseScorer("keyed", tok, keyed, prompt_column="question")
    assert scorer.decode(*responses) == [t for row in TEXTS for t in row]


def test_rewards_are_each_decoded_responses_reward_with_its_own_prompts_row(tok, responses):
    """Calling the scorer gives float32 [N, S]: response j of prompt i scored with row i."""
    scorer = ResponseScorer("keyed", tok, keyed, prompt_column="question")
    got = scorer(ROWS, *responses)
    assert got.dtype == np.float32 and got.shape == (3, 2)
    np.testing.assert_array_equal(got, _reference(tok, keyed, *responses))
    analytic = [[len(t) + 100 * i for t in TEXTS[i]] for i in range(3)]
    np.testing.assert_array_equal(got, np.asarray(analytic, np.float32))
    total, parts = scorer.score_parts(ROWS, *responses)
    np.testing.assert_array_equal(total, got)
    assert parts == {}  # only a weighted reward has parts


def test_score_texts_repeats_each_row_once_per_sample():
    """`score_texts` hands the reward each row S times in a row, beside its S texts."""
    seen = []

    def recording(rows, texts):
        seen.append((list(rows), list(texts)))
        return np.zeros(len(texts), np.float32)

    scorer = ResponseScorer("recording", None, recording)
    texts = ["a", "b", "c", "d", "e", "f"]
    total, _ = scorer.score_texts(ROWS[:2], texts, 3)
    assert total.shape == (2, 3)
    assert seen == [([ROWS[0]] * 3 + [ROWS[1]] * 3, texts)]


def test_weighted_reward_total_and_parts_match_its_components_called_directly(tok, responses):
    """A weighted reward: total Σ w·r_k and each component's own [N, S] scores; `part_means`
    gives each component's mean under prefix.label."""
    fn = WeightedReward([Component("len", 2.0, keyed), Component("vowels", -0.5, tiny_reward)])
    scorer = ResponseScorer("weighted", tok, fn, prompt_column="question")
    total, parts = scorer.score_parts(ROWS, *responses)
    ref_len = _reference(tok, keyed, *responses)
    ref_vowels = _reference(tok, tiny_reward, *responses)
    assert set(parts) == {"len", "vowels"}
    np.testing.assert_array_equal(parts["len"], ref_len)
    np.testing.assert_array_equal(parts["vowels"], ref_vowels)
    expected = 2.0 * ref_len.astype(np.float64) - 0.5 * ref_vowels.astype(np.float64)
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    means = part_means("reward_new", parts)
    assert means.keys() == {"reward_new.len", "reward_new.vowels"}
    for label, ref in (("len", ref_len), ("vowels", ref_vowels)):
        values = [float(v) for v in ref.ravel()]
        assert means[f"reward_new.{label}"] == pytest.approx(math.fsum(values) / 6, rel=1e-12)


def test_part_means_accumulate_in_float64():
    """`part_means` sums in float64: 1e8 + 1 + 1 + 1 keeps its ones (float32 would lose them)."""
    parts = {"a": np.asarray([[1e8, 1.0], [1.0, 1.0]], np.float32), "b": np.zeros((2, 2))}
    assert part_means("eval.reward", parts) == {"eval.reward.a": 25_000_000.75,
                                                "eval.reward.b": 0.0}
    assert part_means("x", {}) == {}


def _nan_on_4th(rows, texts):
    out = keyed(rows, texts)
    if len(texts) == 6:
        out[3] = np.nan
    return out


def _raises_on_rhythm(rows, texts):
    if any(t.startswith("rhythm") for t in texts):
        raise ValueError("no vowels to count")
    return keyed(rows, texts)


@pytest.mark.parametrize(
    "fn, message",
    [
        (_nan_on_4th, "reward 'keyed': score nan for response 3 is not finite (prompt: 'q1')"),
        (_raises_on_rhythm,
         "reward 'keyed' raised ValueError: no vowels to count on response 4 (prompt: 'q2')"),
        (lambda rows, texts: keyed(rows, texts)[:5],
         "reward 'keyed': expected 6 scores of shape (6,), one per response, got (5,)"),
    ],
    ids=["nan", "raises", "too few scores"],
)
def test_a_bad_reward_stops_with_one_line_naming_the_response_and_its_prompt(
    tok, responses, fn, message
):
    """A reward that returns NaN, raises or returns too few scores: one RewardError line naming
    the response (prompt-major index) and its prompt from `prompt_column`."""
    scorer = ResponseScorer("keyed", tok, fn, prompt_column="question")
    with pytest.raises(RewardError) as info:
        scorer(ROWS, *responses)
    assert str(info.value) == message and isinstance(info.value, RunError)


def test_rows_that_do_not_match_the_responses_are_refused():
    """Fewer rows than prompts' worth of texts: a RewardError counting both, not a misalignment."""
    scorer = ResponseScorer("keyed", None, keyed, prompt_column="question")
    with pytest.raises(RewardError, match=r"^reward 'keyed': 4 rows but 6 responses; expected one"):
        scorer.score_texts(ROWS[:2], ["a"] * 6, 2)

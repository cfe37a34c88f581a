"""`optune_jax.evaluate` at its own boundary (design §6): the Evaluator against a fake generator,
scorer and π_0 pass with hand-set tokens, logps and rewards; `win_score` and `mean_ci95` by hand.
The end-to-end evaluation of a real tiny run is in test_drift.py."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optune_jax.evaluate import EVAL_SEED_OFFSET, Evaluator, mean_ci95
from optune_jax.run.config_file import load_config
from sampling import Generation

TINY = load_config(Path(__file__).resolve().parents[1] / "configs/tiny.yaml")
EOS, PAD = 2, 9  # PAD: the prompt padding of the π_0 rows (responses come padded with 0)
SEED, PROMPT_LEN, COLUMN = 7, 6, "instruction"
PREFIX = (1, 2)
PROMPTS = [[1, 2, 3], [1, 2, 4, 5], [1, 2, 6]]
ROWS = [
    {COLUMN: "Tell me about cats", "topic": ["cat"]},
    {COLUMN: "Cats again", "topic": ["cat"]},
    {COLUMN: "The weather", "topic": ["sun"]},
]
WORDS = {10: "good", 11: "day!", 12: "bad", 13: "cat", 14: "dog", 15: "wow!", 16: "sun",
         17: "rain", 20: "alpha", 21: "cats", 22: "gamma", 30: "x", 31: "y", 32: "z", 33: "w",
         34: "v"}


def _gen(rows):
    """A Generation [N, S, 6] from per prompt, per sample (tokens, finished, logps) triples;
    a response's length is its number of logps, tokens and logps padded with 0."""
    n, s = len(rows), len(rows[0])
    tokens, logps = np.zeros((n, s, 6), np.int32), np.zeros((n, s, 6), np.float32)
    lengths, finished = np.zeros((n, s), np.int32), np.zeros((n, s), bool)
    for i, samples in enumerate(rows):
        for j, (toks, fin, lps) in enumerate(samples):
            tokens[i, j, : len(toks)] = toks
            logps[i, j, : len(lps)] = lps
            lengths[i, j], finished[i, j] = len(lps), fin
    return Generation(tokens, lengths, finished, logps, tokens_generated=0, max_cache_bytes=0,
                      shapes=set())


# eval.samples_per_prompt = 2 draws with the `sampling.*` settings
MAIN = _gen([
    [([10, 11, EOS], True, [-1.0, -0.5, -0.25]),
     ([12, 13, 14, 15, 16, 17], False, [-1.0] * 6)],
    [([13, EOS], True, [-2.0, -0.5]),
     ([11], False, [-0.75])],  # cut at the budget
    [([14, 15, 16, 17, EOS], True, [-0.5] * 5),
     ([15] * 6, False, [-0.125] * 6)],
])
# a separate exact draw, one per prompt (when the `sampling.*` settings truncate)
EXACT_DRAW = _gen([
    [([30, EOS], True, [-1.0, -1.0])],
    [([31, 32, 33, EOS], True, [-0.5] * 4)],
    [([34, EOS], True, [-0.25, -0.25])],
])
# greedy answers (the sampler's logps of a greedy draw are not used)
GREEDY = _gen([
    [([20, 21, EOS], True, [-0.1] * 3)],
    [([22] * 6, False, [-0.1] * 6)],
    [([EOS], True, [-0.1])],
])
# rewards of the main samples' texts; the texts' lengths in words are the reward's one component
REWARD = {"good day!": 0.5, "bad cat dog wow! sun rain": 1.0, "cat": 0.25, "day!": 0.0,
          "dog wow! sun rain": 2.0, "wow! wow! wow! wow! wow! wow!": -1.0}
# log π_0 (summed) of each response, keyed by its tokens
LOGP0 = {(10, 11, EOS): -3.0, (13, EOS): -4.0, (14, 15, 16, 17, EOS): -5.0,
         (30, EOS): -2.5, (31, 32, 33, EOS): -3.0, (34, EOS): -1.0,
         (20, 21, EOS): -1.5, (22,) * 6: -3.0, (EOS,): -0.5}


class FakeGenerator:
    """Generator.__call__'s signature: MAIN, EXACT_DRAW (a temperature override) or GREEDY."""

    def __init__(self):
        self.calls = []

    def __call__(self, params, prompts, ids, *, seed, iteration, num_samples, desc, prefix,
                 max_new=None, batch=None, **override):
        self.calls.append(dict(params=params, prompts=prompts, ids=np.asarray(ids), seed=seed,
                               iteration=iteration, num_samples=num_samples, prefix=prefix,
                               max_new=max_new, batch=batch, override=override))
        if override.get("greedy"):
            return GREEDY
        return EXACT_DRAW if "temperature" in override else MAIN


class FakeScorer:
    """ResponseScorer's decode / texts / score_texts over WORDS (EOS and padding skipped)."""

    def __init__(self):
        self.texts_calls, self.scored = [], []

    def _texts(self, tokens_NY, lengths_N):
        return [" ".join(WORDS[int(t)] for t in row[:n] if int(t) in WORDS)
                for row, n in zip(tokens_NY, lengths_N, strict=True)]

    def texts(self, tokens_NY, lengths_N):
        self.texts_calls.append((np.array(tokens_NY), np.array(lengths_N)))
        return self._texts(tokens_NY, lengths_N)

    def decode(self, tokens_NSY, lengths_NS):
        n, s = lengths_NS.shape
        return self._texts(tokens_NSY.reshape(n * s, -1), lengths_NS.reshape(-1))

    def score_texts(self, rows, texts, s):
        self.scored.append((list(rows), list(texts), s))
        n = len(rows)
        rewards = np.array([REWARD[t] for t in texts], np.float32).reshape(n, s)
        words = np.array([len(t.split()) for t in texts], np.float32).reshape(n, s)
        return rewards, {"words": words}


class FakeRef:
    """ReferenceLogps: log π_0 [N, S] of the response tokens of rows [N, S, T], from LOGP0."""

    def __init__(self):
        self.calls = []

    def __call__(self, params, tokens, attn, resp, *, summed=False):
        self.calls.append(dict(params=params, tokens=tokens, attn=attn, resp=resp,
                               summed=summed))
        out = np.zeros(tokens.shape[:2], np.float32)
        for i in range(tokens.shape[0]):
            for j in range(tokens.shape[1]):
                out[i, j] = LOGP0[tuple(int(t) for t in tokens[i, j][resp[i, j] == 1])]
        return out


def make(*, drift=True, examples=2, rows=ROWS, **sampling):
    """An Evaluator over the three prompts with fakes, and the fakes."""
    e = dataclasses.replace(TINY.eval, samples_per_prompt=2, max_new_tokens=6, batch_size=2,
                            drift=drift, examples=examples)
    s = dataclasses.replace(TINY.sampling, **sampling)
    gen, scorer, ref = FakeGenerator(), FakeScorer(), FakeRef()
    ev = Evaluator(settings=e, sampling=s, seed=SEED, prompt_len=PROMPT_LEN,
                   prompt_column=COLUMN, generator=gen, scorer=scorer, ref_logps=ref,
                   prompts=PROMPTS, rows=rows, prefix=PREFIX,
                   initial_params={"pi0": 1} if drift else None, pad_id=PAD)
    return ev, gen, scorer, ref


EXACT_SETTINGS = dict(temperature=1.0, top_p=1.0, top_k=0)
POLICY = {"pi_t": 0}


def test_heldout_reward_is_the_mean_over_prompts_of_each_prompts_sample_mean():
    """Rewards [N] are per-prompt means over the S samples; eval.reward their mean; the sample
    statistics (EOS rate, length, '!', reward components, on-topic) are over all N·S samples."""
    ev, _, scorer, _ = make(drift=False)
    rewards, record = ev(POLICY)
    np.testing.assert_allclose(rewards, [0.75, 0.125, 0.5])
    assert record["eval.reward"] == pytest.approx((0.75 + 0.125 + 0.5) / 3)
    assert record["eval.prompts"] == 3 and record["eval.samples"] == 2
    assert record["eval.eos_rate"] == pytest.approx(3 / 6)
    assert record["eval.response_tokens"] == pytest.approx((3 + 6 + 2 + 1 + 5 + 6) / 6)
    assert record["eval.exclamations"] == pytest.approx((1 + 1 + 0 + 1 + 1 + 6) / 6)
    assert record["eval.reward.words"] == pytest.approx((2 + 6 + 1 + 1 + 4 + 6) / 6)
    # 'cat' in sample 2 of prompt 0 and sample 1 of prompt 1, 'sun' in sample 1 of prompt 2
    assert record["eval.on_topic"] == pytest.approx(3 / 6)
    [(rows, texts, s)] = scorer.scored
    assert rows == ROWS and s == 2
    assert texts == ["good day!", "bad cat dog wow! sun rain", "cat", "day!",
                     "dog wow! sun rain", "wow! wow! wow! wow! wow! wow!"]


def test_without_drift_one_draw_of_the_heldout_ids_and_no_pi0_pass():
    """eval.drift=false: one generator call (held-out ids, seed + EVAL_SEED_OFFSET, iteration
    0, eval.max_new_tokens, eval.batch_size, the prefix, S samples, the `sampling.*` settings),
    no greedy draw, no π_0 pass and no drift keys."""
    ev, gen, scorer, ref = make(drift=False)
    _, record = ev(POLICY)
    [call] = gen.calls
    assert call["params"] is POLICY and call["prompts"] is PROMPTS
    np.testing.assert_array_equal(call["ids"], [0, 1, 2])
    assert call["seed"] == SEED + EVAL_SEED_OFFSET and call["iteration"] == 0
    assert (call["num_samples"], call["max_new"], call["batch"]) == (2, 6, 2)
    assert call["prefix"] == PREFIX and call["override"] == {}
    assert ref.calls == [] and scorer.texts_calls == []
    assert not [k for k in record if "kl" in k or "nll" in k or "greedy" in k]
    assert "eval.examples" not in record


def test_heldout_draws_use_the_same_stream_at_every_evaluation():
    """Two evaluations (different params) ask for the same seed and iteration: draws pair per
    prompt across iterations; the stream is not the run's own seed."""
    ev, gen, _, _ = make(drift=False)
    ev({"a": 1})
    ev({"b": 2})
    assert [(c["seed"], c["iteration"]) for c in gen.calls] == [(SEED + EVAL_SEED_OFFSET, 0)] * 2
    assert EVAL_SEED_OFFSET != 0


def test_unset_eval_budget_and_batch_are_left_to_the_generator():
    """eval.max_new_tokens / eval.batch_size None reach the generator as None (its
    `sampling.*` fallback)."""
    ev, gen, _, _ = make(drift=False)
    ev.settings = dataclasses.replace(ev.settings, max_new_tokens=None, batch_size=None)
    ev(POLICY)
    assert (gen.calls[0]["max_new"], gen.calls[0]["batch"]) == (None, None)


def test_drift_with_exact_sampling_reuses_each_prompts_first_sample():
    """Exact `sampling.*`: the held-out draw and a greedy draw only; KL per token = (Σ logp_t −
    Σ logp_0) / tokens over each prompt's first sample, with the sampler's logps as logp_t."""
    ev, gen, _, ref = make(**EXACT_SETTINGS)
    _, record = ev(POLICY)
    assert [c["override"] for c in gen.calls] == [{}, {"greedy": True}]
    greedy = gen.calls[1]
    assert greedy["num_samples"] == 1 and greedy["seed"] == SEED + EVAL_SEED_OFFSET
    assert (greedy["iteration"], greedy["max_new"], greedy["batch"]) == (0, 6, 2)
    assert greedy["prefix"] == PREFIX and greedy["params"] is POLICY
    np.testing.assert_array_equal(greedy["ids"], [0, 1, 2])
    # first samples: logp_t sums -1.75, -2.5, -2.5; logp_0 -3, -4, -5; 3 + 2 + 5 tokens
    assert record["eval.kl_initial"] == pytest.approx((-6.75 - (-12.0)) / 10)
    [call] = ref.calls
    assert call["summed"] is True and call["params"] == {"pi0": 1}


def test_greedy_answers_nll_eos_length_repetition_and_topic():
    """The greedy answers' NLL per token under π_0, EOS rate, mean length, seq-rep-4 over their
    real tokens only and on-topic rate, by hand."""
    ev, _, _, _ = make()
    _, record = ev(POLICY)
    # greedy log π_0: -1.5, -3.0, -0.5 over 3 + 6 + 1 tokens
    assert record["eval.nll_initial"] == pytest.approx(5.0 / 10)
    assert record["eval.greedy_eos_rate"] == pytest.approx(2 / 3)
    assert record["eval.greedy_tokens"] == pytest.approx(10 / 3)
    # [22]*6: 3 4-grams, 1 distinct; the others are shorter than 4 tokens (their padding,
    # [EOS, 0, 0, 0, 0, 0], would add 1 - 2/3 if it were counted)
    assert record["eval.greedy_rep4"] == pytest.approx((1 - 1 / 3) / 3)
    assert record["eval.greedy_on_topic"] == pytest.approx(1 / 3)  # 'alpha cats' ~ 'cat'


@pytest.mark.parametrize("truncating", [dict(top_p=0.9), dict(top_p=1.0, temperature=0.7),
                                        dict(top_p=1.0, top_k=5)])
def test_drift_with_truncated_sampling_draws_exact_samples_apart(truncating):
    """Non-exact `sampling.*`: a separate draw at temperature 1 without truncation (one sample
    per prompt, iteration 1 of the held-out stream) carries the KL estimate; greedy comes last."""
    ev, gen, _, ref = make(**truncating)
    _, record = ev(POLICY)
    overrides = [c["override"] for c in gen.calls]
    assert overrides == [{}, EXACT_SETTINGS, {"greedy": True}]
    kl_call = gen.calls[1]
    assert (kl_call["num_samples"], kl_call["iteration"]) == (1, 1)
    assert kl_call["seed"] == SEED + EVAL_SEED_OFFSET and kl_call["params"] is POLICY
    assert (kl_call["max_new"], kl_call["batch"], kl_call["prefix"]) == (6, 2, PREFIX)
    # exact draw: logp_t sums -2, -2, -0.5; logp_0 -2.5, -3, -1; 2 + 4 + 2 tokens
    assert record["eval.kl_initial"] == pytest.approx((-4.5 - (-6.5)) / 8)
    assert record["eval.nll_initial"] == pytest.approx(5.0 / 10)
    assert len(ref.calls) == 1  # one π_0 pass for samples and greedy answers together


@pytest.mark.parametrize("sampling", [EXACT_SETTINGS, dict(top_p=0.9)])
def test_initial_policy_has_kl_zero_and_no_extra_exact_draw(sampling):
    """`initial=True`: eval.kl_initial is 0 by definition (the hand KL would be 0.525), no exact
    KL draw is made, and the greedy NLL is still measured."""
    ev, gen, _, _ = make(**sampling)
    _, record = ev(POLICY, initial=True)
    assert record["eval.kl_initial"] == 0.0
    assert [c["override"] for c in gen.calls] == [{}, {"greedy": True}]
    assert record["eval.nll_initial"] == pytest.approx(5.0 / 10)


def test_pi0_pass_gets_samples_and_greedy_answers_side_by_side():
    """One π_0 pass over rows [N, 2, prompt_len + Y]: the prompt left-padded with pad_id, then
    the KL sample (column 0) and the greedy answer (column 1), prompt and response masked."""
    ev, _, _, ref = make(**EXACT_SETTINGS)
    ev(POLICY)
    [call] = ref.calls
    tokens, attn, resp = call["tokens"], call["attn"], call["resp"]
    assert tokens.shape == attn.shape == resp.shape == (3, 2, PROMPT_LEN + 6)
    np.testing.assert_array_equal(tokens[0, 0], [9, 9, 9, 1, 2, 3, 10, 11, 2, 0, 0, 0])
    np.testing.assert_array_equal(attn[0, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(resp[0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(tokens[1, 1], [9, 9, 1, 2, 4, 5, 22, 22, 22, 22, 22, 22])
    np.testing.assert_array_equal(attn[1, 1], [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(resp[2, 1], [0] * 6 + [1, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("k, expected", [(0, 0), (2, 2), (5, 3)])
def test_examples_are_the_first_prompts_with_their_greedy_answers(k, expected):
    """eval.examples: the first min(eval.examples, N) rows' prompt column with the greedy answer
    decoded from its real tokens."""
    ev, _, scorer, _ = make(examples=k)
    _, record = ev(POLICY)
    answers = ["alpha cats", "gamma gamma gamma gamma gamma gamma", ""]
    assert record["eval.examples"] == [
        {"prompt": ROWS[i][COLUMN], "answer": answers[i]} for i in range(expected)
    ]
    [(tokens, lengths)] = scorer.texts_calls  # the greedy answers [N, Y] and their lengths
    np.testing.assert_array_equal(tokens, GREEDY.tokens[:, 0])
    np.testing.assert_array_equal(lengths, [3, 6, 1])


def test_on_topic_keys_need_a_topic_on_every_row():
    """A row without `topic` drops eval.on_topic and eval.greedy_on_topic; the rest stays."""
    rows = [ROWS[0], {COLUMN: "no topic"}, ROWS[2]]
    ev, _, _, _ = make(rows=rows)
    _, record = ev(POLICY)
    assert "eval.on_topic" not in record and "eval.greedy_on_topic" not in record
    assert record["eval.reward"] == pytest.approx(1.375 / 3)
    assert record["eval.examples"][1] == {"prompt": "no topic",
                                          "answer": "gamma gamma gamma gamma gamma gamma"}


def test_win_score_by_hand():
    """50 + 100·(wins − losses)/n with strict comparisons: ties count in n only."""
    win = Evaluator.win_score
    # wins: 1 > 0, 4 > 1; tie: 2 = 2; loss: 3 < 5
    assert win(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 2.0, 5.0, 1.0])) == 75.0
    assert win(np.array([0.5, 0.5, 0.1]), np.array([0.5, 0.5, 0.2])) == pytest.approx(50 - 100 / 3)
    x = np.array([0.3, -1.0, 2.0])
    assert win(x, x.copy()) == 50.0  # π_0 against itself
    assert win(x + 1, x) == 150.0 and win(x - 1, x) == -50.0  # the range's ends


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=1, max_size=20))
def test_win_score_matches_a_count_and_stays_in_range(pairs):
    """win_score equals a plain count of strict wins and losses and lies in [−50, 150]."""
    wins = sum(a > b for a, b in pairs)
    losses = sum(a < b for a, b in pairs)
    a, b = (np.array(v, np.float64) for v in zip(*pairs, strict=True))
    score = Evaluator.win_score(a, b)
    assert score == pytest.approx(50 + 100 * (wins - losses) / len(pairs))
    assert -50.0 <= score <= 150.0


def test_mean_ci95_by_hand():
    """1.96 · sd (n − 1) / √n; nan for fewer than 2 values."""
    # [1, 2, 3, 4]: squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, sd = √(5/3)
    assert mean_ci95(np.array([1, 2, 3, 4])) == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)
    assert mean_ci95(np.array([-0.5, 0.5])) == pytest.approx(1.96 * math.sqrt(0.5) / math.sqrt(2))
    assert mean_ci95(np.full(5, 2.5)) == 0.0
    assert math.isnan(mean_ci95(np.array([0.7])))
    assert math.isnan(mean_ci95(np.array([])))

"""Properties of OPTune selection and pair assembly against brute-force pure-Python references."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optune_jax import selection

SETTINGS = settings(max_examples=150, deadline=None)

# rho as k / 1000 so the reference ceil(rho * P) is exact integer arithmetic.
rho_permille = st.integers(min_value=1, max_value=1000)
# Few distinct values so that ties are common.
small_keys = st.lists(st.integers(-3, 3).map(float), min_size=1, max_size=60)


def _ref_num_selected(permille: int, num_prompts: int) -> int:
    return -(-permille * num_prompts // 1000)


def _random_pool(rng, num_prompts, max_len=6, *, iteration=0, reward_values=None):
    lengths_P2 = rng.integers(0, max_len + 1, (num_prompts, 2)).astype(np.int32)
    tokens_P2Y = rng.integers(1, 50, (num_prompts, 2, max_len)).astype(np.int32)
    tokens_P2Y[np.arange(max_len)[None, None, :] >= lengths_P2[..., None]] = 0
    if reward_values is None:
        rewards_P2 = rng.normal(size=(num_prompts, 2)).astype(np.float32)
    else:
        rewards_P2 = rng.choice(reward_values, size=(num_prompts, 2)).astype(np.float32)
    iteration_P = np.full(num_prompts, iteration, np.int32)
    return selection.PromptPool(tokens_P2Y, lengths_P2, rewards_P2, iteration_P)


# ---------------------------------------------------------------- num_selected / validation


@pytest.mark.parametrize(
    "rho, num_prompts, expected",
    [
        (0.3, 10, 3),
        (0.7, 10, 7),
        (0.1, 30, 3),
        (0.6, 5, 3),
        (0.5, 48_000, 24_000),
        (0.3, 48_000, 14_400),
        (0.7, 48_000, 33_600),
        (1e-9, 10, 1),
        (0.31, 10, 4),
        (1.0, 7, 7),
        (0.5, 0, 0),
    ],
)
def test_num_selected_guards_float_error(rho, num_prompts, expected):
    assert selection.num_selected(num_prompts, rho) == expected


@given(permille=rho_permille, num_prompts=st.integers(0, 5000))
@SETTINGS
def test_num_selected_matches_exact_ceil(permille, num_prompts):
    expected = _ref_num_selected(permille, num_prompts)
    assert selection.num_selected(num_prompts, permille / 1000) == expected


@pytest.mark.parametrize("rho", [0, 0.0, -0.1, 1.0001, 2, float("nan"), True, "0.5", None])
def test_bad_rho_is_one_line_error(rho):
    pool = selection.PromptPool.empty(4, 3)
    with pytest.raises(ValueError, match=r"rho") as info:
        selection.select(pool, rho, rng=np.random.default_rng(0))
    assert "\n" not in str(info.value)


def test_unknown_method_and_key_name_value_and_allowed():
    pool = selection.PromptPool.empty(4, 3)
    with pytest.raises(ValueError, match=r"'best'.*reward.*random"):
        selection.select(pool, 0.5, selection="best", rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"'max'.*chosen.*mean.*rejected"):
        selection.select(pool, 0.5, rank_key="max", rng=np.random.default_rng(0))


# ---------------------------------------------------------------- ranking keys


def test_ranking_keys():
    rewards_P2 = np.array([[1.0, 3.0], [2.0, -1.0]], np.float32)
    np.testing.assert_array_equal(selection.ranking_keys(rewards_P2), [3.0, 2.0])
    np.testing.assert_array_equal(selection.ranking_keys(rewards_P2, "mean"), [2.0, 0.5])
    np.testing.assert_array_equal(selection.ranking_keys(rewards_P2, "rejected"), [1.0, -1.0])


# ---------------------------------------------------------------- select_lowest


@given(keys=small_keys, permille=rho_permille, seed=st.integers(0, 2**32 - 1))
@SETTINGS
def test_select_lowest_takes_exactly_the_lowest(keys, permille, seed):
    keys_P = np.array(keys, np.float32)
    idx = selection.select_lowest(keys_P, permille / 1000, np.random.default_rng(seed))
    chosen = [int(i) for i in idx]
    assert len(chosen) == _ref_num_selected(permille, len(keys))
    assert len(set(chosen)) == len(chosen) and chosen == sorted(chosen)
    # The selected keys are, as a multiset, the N smallest keys.
    assert sorted(keys[i] for i in chosen) == sorted(keys)[: len(chosen)]
    # All strictly-lower before any higher: a prompt strictly below some selected prompt is
    # selected, and no selected prompt is above an unselected one. (Strictly below some
    # UNselected prompt is not enough: tied prompts at the boundary may be left out.)
    unselected = [i for i in range(len(keys)) if i not in set(chosen)]
    for i in range(len(keys)):
        if any(keys[i] < keys[j] for j in chosen):
            assert i in chosen
    for i in chosen:
        assert all(keys[i] <= keys[j] for j in unselected)


@given(keys=small_keys, permille=rho_permille, seed=st.integers(0, 2**32 - 1))
@SETTINGS
def test_select_lowest_is_deterministic_under_the_seed(keys, permille, seed):
    keys_P = np.array(keys, np.float32)
    a = selection.select_lowest(keys_P, permille / 1000, np.random.default_rng(seed))
    b = selection.select_lowest(keys_P, permille / 1000, np.random.default_rng(seed))
    np.testing.assert_array_equal(a, b)


def test_ties_differ_across_seeds_and_are_not_input_order():
    keys_P = np.zeros(40, np.float32)
    picks = {
        tuple(selection.select_lowest(keys_P, 0.5, np.random.default_rng(s))) for s in range(10)
    }
    assert len(picks) == 10
    assert tuple(range(20)) not in picks


def test_all_equal_keys_give_a_uniform_seeded_permutation():
    keys_P = np.full(10, 0.25, np.float32)
    counts_P = np.zeros(10)
    for seed in range(2000):
        counts_P[selection.select_lowest(keys_P, 0.3, np.random.default_rng(seed))] += 1
    # Each prompt is picked with probability 0.3 (binomial sd ~ 0.01): input order plays no part.
    np.testing.assert_allclose(counts_P / 2000, 0.3, atol=0.05)


def test_ties_at_the_boundary_are_broken_randomly():
    keys_P = np.array([0.0, 1.0, 1.0, 1.0, 2.0], np.float32)
    seen = set()
    for seed in range(60):
        idx = selection.select_lowest(keys_P, 0.4, np.random.default_rng(seed))
        assert idx[0] == 0 and idx.shape == (2,)
        seen.add(int(idx[1]))
    assert seen == {1, 2, 3}


def test_select_lowest_rejects_nan_keys():
    with pytest.raises(ValueError, match="NaN at prompt 1"):
        selection.select_lowest(np.array([0.0, np.nan]), 0.5, np.random.default_rng(0))


# ---------------------------------------------------------------- select_random / select front


@given(num_prompts=st.integers(1, 200), permille=rho_permille, seed=st.integers(0, 2**32 - 1))
@SETTINGS
def test_select_random_picks_exactly_n_distinct(num_prompts, permille, seed):
    idx = selection.select_random(num_prompts, permille / 1000, np.random.default_rng(seed))
    assert idx.shape == (_ref_num_selected(permille, num_prompts),)
    assert len(set(idx.tolist())) == idx.shape[0]
    assert idx.min() >= 0 and idx.max() < num_prompts and list(idx) == sorted(idx)


def test_select_random_ignores_rewards_and_differs_across_seeds():
    pool = _random_pool(np.random.default_rng(0), 50)
    a = selection.select(pool, 0.3, selection="random", rng=np.random.default_rng(1))
    b = selection.select(pool, 0.3, selection="random", rng=np.random.default_rng(2))
    lowest = selection.select(pool, 0.3, rng=np.random.default_rng(1))
    assert a.shape == b.shape == lowest.shape == (15,)
    assert not np.array_equal(a, b) and not np.array_equal(a, lowest)


@pytest.mark.parametrize("method", selection.SELECTIONS)
@pytest.mark.parametrize("rho", [0.1, 0.5, 1.0])
def test_iteration_zero_selects_everything(method, rho):
    pool = selection.PromptPool.empty(12, 4)
    idx = selection.select(pool, rho, selection=method, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(idx, np.arange(12))


def test_any_never_generated_prompt_selects_everything():
    rng = np.random.default_rng(0)
    pool = _random_pool(rng, 8)
    iteration_P = pool.iteration_P.copy()
    iteration_P[5] = selection.NEVER_GENERATED
    rewards_P2 = pool.rewards_P2.copy()
    rewards_P2[5] = np.nan
    partial = selection.PromptPool(pool.tokens_P2Y, pool.lengths_P2, rewards_P2, iteration_P)
    np.testing.assert_array_equal(selection.select(partial, 0.25, rng=rng), np.arange(8))


@pytest.mark.parametrize("key", selection.RANKING_KEYS)
def test_select_rho_one_and_key_choice(key):
    rng = np.random.default_rng(3)
    pool = _random_pool(rng, 20)
    np.testing.assert_array_equal(selection.select(pool, 1.0, rank_key=key, rng=rng), np.arange(20))
    idx = selection.select(pool, 0.25, rank_key=key, rng=rng)
    keys_P = selection.ranking_keys(pool.rewards_P2, key)
    np.testing.assert_array_equal(np.sort(keys_P[idx]), np.sort(keys_P)[:5])


# ---------------------------------------------------------------- update_pool


@given(num_prompts=st.integers(1, 30), permille=rho_permille, seed=st.integers(0, 2**32 - 1))
@SETTINGS
def test_update_pool_replaces_selected_and_keeps_the_rest_byte_identical(
    num_prompts, permille, seed
):
    rng = np.random.default_rng(seed)
    pool = _random_pool(rng, num_prompts)
    before = [
        np.array(a, copy=True)
        for a in (pool.tokens_P2Y, pool.lengths_P2, pool.rewards_P2, pool.iteration_P)
    ]
    idx = selection.select(pool, permille / 1000, rng=rng)
    new = _random_pool(rng, idx.shape[0], pool.max_len)
    updated = selection.update_pool(
        pool, idx, new.tokens_P2Y, new.lengths_P2, new.rewards_P2, iteration=3
    )
    selected = set(idx.tolist())
    for i in range(num_prompts):
        for name, old in zip(
            ("tokens_P2Y", "lengths_P2", "rewards_P2", "iteration_P"), before, strict=True
        ):
            got = getattr(updated, name)[i]
            if i in selected:
                j = int(np.flatnonzero(idx == i)[0])
                want = getattr(new, name)[j] if name != "iteration_P" else np.int32(3)
                assert np.array_equal(got, want)
            else:
                assert got.tobytes() == old[i].tobytes()
    # The input pool is untouched.
    for name, old in zip(
        ("tokens_P2Y", "lengths_P2", "rewards_P2", "iteration_P"), before, strict=True
    ):
        assert getattr(pool, name).tobytes() == old.tobytes()


def test_pool_arrays_are_read_only():
    pool = selection.PromptPool.empty(3, 2)
    with pytest.raises(ValueError):
        pool.tokens_P2Y[0, 0, 0] = 7
    with pytest.raises(AttributeError):
        pool.pad_id = 3


def test_empty_pool():
    pool = selection.PromptPool.empty(3, 4, pad_id=9)
    assert pool.tokens_P2Y.shape == (3, 2, 4) and (pool.tokens_P2Y == 9).all()
    assert (pool.iteration_P == -1).all() and np.isnan(pool.rewards_P2).all()
    assert pool.num_prompts == 3 and pool.max_len == 4


def test_pool_rejects_bad_arrays():
    with pytest.raises(ValueError, match="lengths_P2.*dtype int32"):
        selection.PromptPool(
            np.zeros((2, 2, 3), np.int32),
            np.zeros((2, 2), np.int64),
            np.zeros((2, 2), np.float32),
            np.zeros(2, np.int32),
        )
    with pytest.raises(ValueError, match="generated prompt 1 has a non-finite reward"):
        selection.PromptPool(
            np.zeros((2, 2, 3), np.int32),
            np.zeros((2, 2), np.int32),
            np.array([[0, 1], [np.inf, 0]], np.float32),
            np.zeros(2, np.int32),
        )


@pytest.mark.parametrize(
    "idx, tokens_shape, rewards, match",
    [
        ([0, 0], (2, 2, 4), [[0, 1], [1, 0]], "repeated"),
        ([0, 5], (2, 2, 4), [[0, 1], [1, 0]], "out of range"),
        ([0, 1], (2, 2, 3), [[0, 1], [1, 0]], "tokens_N2Y must have shape"),
        ([0, 1], (2, 2, 4), [[0, np.nan], [1, 0]], "NaN or infinite"),
    ],
)
def test_update_pool_rejects_bad_input(idx, tokens_shape, rewards, match):
    pool = selection.PromptPool.empty(3, 4)
    with pytest.raises(ValueError, match=match):
        selection.update_pool(
            pool,
            np.array(idx),
            np.zeros(tokens_shape, np.int32),
            np.zeros((2, 2), np.int32),
            np.array(rewards, np.float32),
            0,
        )


# ---------------------------------------------------------------- build_pairs


@given(num_prompts=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
@SETTINGS
def test_build_pairs_matches_reference(num_prompts, seed):
    rng = np.random.default_rng(seed)
    pool = _random_pool(rng, num_prompts, reward_values=[0.0, 0.5, 1.0])
    iteration_P = rng.integers(0, 3, num_prompts).astype(np.int32)
    pool = selection.PromptPool(pool.tokens_P2Y, pool.lengths_P2, pool.rewards_P2, iteration_P)
    pairs = selection.build_pairs(pool, iteration=2)

    ref_idx, ties, new_rewards, kept_rewards = [], 0, [], []
    for i in range(num_prompts):
        r1, r2 = float(pool.rewards_P2[i, 0]), float(pool.rewards_P2[i, 1])
        (new_rewards if iteration_P[i] == 2 else kept_rewards).append((r1 + r2) / 2)
        if r1 == r2:
            ties += 1
            continue
        w = 0 if r1 > r2 else 1
        k = len(ref_idx)
        ref_idx.append(i)
        assert pairs.chosen_tokens_QY[k].tobytes() == pool.tokens_P2Y[i, w].tobytes()
        assert pairs.rejected_tokens_QY[k].tobytes() == pool.tokens_P2Y[i, 1 - w].tobytes()
        assert pairs.chosen_lengths_Q[k] == pool.lengths_P2[i, w]
        assert pairs.rejected_lengths_Q[k] == pool.lengths_P2[i, 1 - w]
        assert pairs.chosen_rewards_Q[k] == max(r1, r2) > pairs.rejected_rewards_Q[k] == min(r1, r2)
        assert pairs.is_new_Q[k] == (iteration_P[i] == 2)
    assert pairs.prompt_idx_Q.tolist() == ref_idx
    assert pairs.num_ties == ties == int(pairs.tie_P.sum())
    assert pairs.num_new == len(new_rewards) and pairs.num_kept == len(kept_rewards)
    for got, want in ((pairs.mean_reward_new, new_rewards), (pairs.mean_reward_kept, kept_rewards)):
        if want:
            assert math.isclose(got, sum(want) / len(want), rel_tol=1e-6, abs_tol=1e-6)
        else:
            assert math.isnan(got)


def test_build_pairs_refuses_never_generated_prompts():
    with pytest.raises(ValueError, match="prompt 0 was never generated"):
        selection.build_pairs(selection.PromptPool.empty(2, 3), iteration=0)


def test_one_iteration_end_to_end():
    """Iteration 0 generates all; iteration 1 regenerates the lowest and keeps the rest."""
    rng = np.random.default_rng(0)
    pool = selection.PromptPool.empty(10, 3)
    idx0 = selection.select(pool, 0.3, rng=rng)
    rewards0 = np.arange(20, dtype=np.float32).reshape(10, 2)[::-1].copy()
    pool = selection.update_pool(
        pool, idx0, np.ones((10, 2, 3), np.int32), np.full((10, 2), 3, np.int32), rewards0, 0
    )
    idx1 = selection.select(pool, 0.3, rng=rng)
    np.testing.assert_array_equal(idx1, [7, 8, 9])  # lowest chosen rewards
    pool = selection.update_pool(
        pool,
        idx1,
        np.zeros((3, 2, 3), np.int32),
        np.ones((3, 2), np.int32),
        np.array([[5, 5], [30, 31], [40, 39]], np.float32),
        1,
    )
    pairs = selection.build_pairs(pool, iteration=1)
    assert (pairs.num_ties, pairs.num_new, pairs.num_kept) == (1, 3, 7)
    assert pairs.prompt_idx_Q.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert math.isclose(pairs.mean_reward_new, (5 + 30.5 + 39.5) / 3)


# ---------------------------------------------------------------- best_and_worst (n samples)

# S samples per prompt with few distinct rewards, so that ties and all-equal rows are common
samples_rows = st.integers(2, 6).flatmap(
    lambda s: st.tuples(
        st.just(s),
        st.lists(st.lists(st.integers(-2, 2).map(float), min_size=s, max_size=s), max_size=12),
    )
)


def _ref_best_and_worst(rewards: list[float]) -> list[int]:
    """Sample indices kept, in sample order: the earliest highest, and the earliest lowest of
    the others."""
    best = min(i for i, r in enumerate(rewards) if r == max(rewards))
    lowest = min(r for i, r in enumerate(rewards) if i != best)
    worst = min(i for i, r in enumerate(rewards) if i != best and r == lowest)
    return sorted([best, worst])


@given(rows=samples_rows, seed=st.integers(0, 2**32 - 1))
@SETTINGS
def test_best_and_worst_matches_reference_and_counts_all_equal_as_ties(rows, seed):
    s, rewards = rows
    n, max_len, rng = len(rewards), 5, np.random.default_rng(seed)
    rewards_NS = np.array(rewards, np.float32).reshape(n, s)
    tokens_NSY = rng.integers(1, 50, (n, s, max_len)).astype(np.int32)
    lengths_NS = rng.integers(0, max_len + 1, (n, s)).astype(np.int32)
    tokens_N2Y, lengths_N2, rewards_N2 = selection.best_and_worst(
        tokens_NSY, lengths_NS, rewards_NS
    )
    assert tokens_N2Y.shape == (n, 2, max_len) and lengths_N2.shape == rewards_N2.shape == (n, 2)
    assert tokens_N2Y.dtype == lengths_N2.dtype == np.int32 and rewards_N2.dtype == np.float32
    for i, row in enumerate(rewards):
        keep = _ref_best_and_worst(row)
        assert [float(r) for r in rewards_N2[i]] == [row[k] for k in keep]
        assert max(rewards_N2[i]) == max(row) and min(rewards_N2[i]) == min(row)
        assert lengths_N2[i].tolist() == [lengths_NS[i, k] for k in keep]
        for j, k in enumerate(keep):
            assert tokens_N2Y[i, j].tobytes() == tokens_NSY[i, k].tobytes()
        if s == 2:  # the pair as drawn: a run with num_samples 2 is what it was
            assert keep == [0, 1]
    # design §4 step 5: a prompt whose S rewards are all equal is a tie, dropped and counted
    pool = selection.update_pool(
        selection.PromptPool.empty(n, max_len), np.arange(n), tokens_N2Y, lengths_N2, rewards_N2, 0
    )
    pairs = selection.build_pairs(pool, iteration=0)
    assert pairs.num_ties == sum(len(set(row)) == 1 for row in rewards)
    assert pairs.chosen_rewards_Q.tolist() == [max(r) for r in rewards if len(set(r)) > 1]


def test_best_and_worst_of_two_is_the_input_and_refuses_bad_rewards():
    rng = np.random.default_rng(0)
    tokens, lengths = rng.integers(0, 9, (7, 2, 4)).astype(np.int32), np.full((7, 2), 4, np.int32)
    rewards = rng.choice([0.0, 1.0], (7, 2)).astype(np.float32)
    for got, want in zip(selection.best_and_worst(tokens, lengths, rewards),
                         (tokens, lengths, rewards), strict=True):
        assert got.tobytes() == want.tobytes()
    with pytest.raises(ValueError, match="at least 2 samples"):
        selection.best_and_worst(tokens[:, :1], lengths[:, :1], rewards[:, :1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        selection.best_and_worst(tokens, lengths, np.where(rewards > 0, np.nan, rewards))
    with pytest.raises(ValueError, match="lengths_NS must have shape"):
        selection.best_and_worst(tokens, lengths[:, :1], rewards)

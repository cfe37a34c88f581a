"""optune_jax.reference_policy (design §3): whose logps each pair of D_t is compared with, checked
against a brute-force NumPy model of 3 iterations with a fake scorer (no model)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from optune_jax.reference_policy import (
    BehaviorReference,
    InitialReference,
    ReferencePolicy,
    make_reference,
)
from optune_jax.run.errors import RunError

Params = collections.namedtuple("Params", "name w")  # a fake policy: a name and one scalar
Rows = collections.namedtuple("Rows", "tokens attn resp")  # any object with the three row arrays

P, T = 6, 7  # prompts, row width
PI = [Params("pi0", 2.0), Params("pi1", 3.0), Params("pi2", 5.0)]  # π_t of iterations 0, 1, 2
INITIAL = Params("initial", 0.5)  # π_0's weights as the run keeps them (told apart from PI[0])
# iteration t regenerates these prompts (all at t = 0); (prompt, t) pairs that are ties never
# enter D_t: prompt 3's pair of t = 0 stays a tie, prompt 4's pair of t = 1 is a tie and is
# replaced at t = 2 (its kept logps still hold the pair of t = 0)
REGEN = [set(range(P)), {1, 4}, {0, 4, 5}]
TIES = {(3, 0), (4, 1)}


class FakeScorer:
    """`scorer(params, tokens, attn, resp)` -> float32 [N, 2] = w * (sum of response tokens);
    records (params name, rows) of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, params, tokens_NST, attn_NST, resp_NST):
        assert tokens_NST.shape == attn_NST.shape == resp_NST.shape
        assert tokens_NST.shape[1] == 2
        self.calls.append((params.name, len(tokens_NST)))
        return np.float32(params.w) * (tokens_NST * resp_NST).sum(-1).astype(np.float32)


def _pair_rows(prompt: int, t: int):
    """tokens, attn, resp [2, T] of the pair prompt `prompt` got at iteration `t` (distinct
    for every (prompt, t))."""
    rng = np.random.default_rng([prompt, t, 7])
    tokens = rng.integers(1, 10, (2, T)).astype(np.int32)
    resp = np.zeros((2, T), np.int32)
    for side in range(2):
        resp[side, 3 : 3 + rng.integers(1, T - 2)] = 1  # 3 prompt columns, 1..T-3 responses
    attn = resp.copy()
    attn[:, :3] = 1
    return tokens, attn, resp


def _sum(prompt: int, t: int) -> np.ndarray:
    """Brute force: the two sides' sums of response tokens, in Python."""
    tokens, _, resp = _pair_rows(prompt, t)
    return np.array(
        [sum(int(x) for x, m in zip(tokens[s], resp[s], strict=True) if m) for s in range(2)],
        np.float64,
    )


def _iterations():
    """(t, prompt_idx, gen_t of each pair, batch, new_Q) of D_0, D_1, D_2."""
    gen = [-1] * P
    for t, regen in enumerate(REGEN):
        for p in regen:
            gen[p] = t
        idx = [p for p in range(P) if (p, gen[p]) not in TIES]
        rows = [_pair_rows(p, gen[p]) for p in idx]
        batch = Rows(*(np.stack([r[k] for r in rows]) for k in range(3)))
        new_Q = np.array([gen[p] == t for p in idx])
        yield t, np.array(idx, np.int32), [gen[p] for p in idx], batch, new_Q


def _run(ref):
    """Every iteration's logps of `ref` and the expected brute-force logps per choice."""
    scorer = FakeScorer()
    out = []
    for t, idx, gens, batch, new_Q in _iterations():
        got = ref.logps(scorer, batch, idx, new_Q, pi_t=PI[t],
                        initial=INITIAL if ref.needs_initial else None)
        expect = {
            "current": [PI[t].w * _sum(p, g) for p, g in zip(idx, gens, strict=True)],
            "behavior": [PI[g].w * _sum(p, g) for p, g in zip(idx, gens, strict=True)],
            "initial": [INITIAL.w * _sum(p, g) for p, g in zip(idx, gens, strict=True)],
        }
        out.append((t, idx, gens, new_Q, np.asarray(got), expect))
    return scorer, out


def test_current_scores_every_pair_with_pi_t_each_iteration_and_keeps_nothing():
    """`current`: π_t scores all pairs of D_t (new and kept) every iteration; kept_P2 stays NaN."""
    ref = make_reference("current", num_prompts=P, loss_name="dpo", pairs_from_file=False)
    assert type(ref) is ReferencePolicy and ref.name == "current" and not ref.needs_initial
    scorer, out = _run(ref)
    for _, idx, _, _, got, expect in out:
        assert got.shape == (len(idx), 2) and got.dtype == np.float32
        np.testing.assert_allclose(got, expect["current"], rtol=1e-6)
    assert scorer.calls == [(f"pi{t}", len(idx)) for t, idx, *_ in out]
    assert ref.kept_P2.shape == (P, 2) and np.isnan(ref.kept_P2).all()


def test_behavior_scores_new_pairs_with_pi_t_and_kept_pairs_keep_their_logps():
    """`behavior`: only the new pairs are scored, by π_t; a kept pair keeps the logps of the
    iteration that generated it (also a prompt whose new pair was a tie left out of D_t)."""
    ref = make_reference("behavior", num_prompts=P, loss_name="wdpo", pairs_from_file=False)
    assert type(ref) is BehaviorReference and not ref.needs_initial
    scorer, out = _run(ref)
    for _, _, _, _, got, expect in out:
        np.testing.assert_allclose(got, expect["behavior"], rtol=1e-6)
    # one call per iteration, of π_t on exactly the new pairs of D_t
    assert scorer.calls == [(f"pi{t}", int(new_Q.sum())) for t, _, _, new_Q, *_ in out]
    assert [n for _, n in scorer.calls] == [5, 1, 3]  # prompt 3 tie at 0; prompt 4 tie at 1
    # the pairs of the last D_t keep their logps for the next iteration (and a checkpoint)
    t, idx, gens, *_ = out[-1]
    np.testing.assert_allclose(
        ref.kept_P2[idx], [PI[g].w * _sum(p, g) for p, g in zip(idx, gens, strict=True)],
        rtol=1e-6)
    assert np.isnan(ref.kept_P2[3]).all()  # a tie from t = 0 on: never in D_t, never scored


def test_initial_scores_each_pair_once_with_pi_0():
    """`initial`: π_0 (never π_t) scores each pair the first time it is in D_t, never twice."""
    ref = make_reference("initial", num_prompts=P, loss_name="hypo", pairs_from_file=False)
    assert type(ref) is InitialReference and ref.needs_initial
    scorer, out = _run(ref)
    for _, _, _, _, got, expect in out:
        np.testing.assert_allclose(got, expect["initial"], rtol=1e-6)
    assert {name for name, _ in scorer.calls} == {"initial"}
    # brute force: the distinct (prompt, generating iteration) pairs that were ever in D_t
    seen = {(int(p), g) for _, idx, gens, *_ in out for p, g in zip(idx, gens, strict=True)}
    assert sum(n for _, n in scorer.calls) == len(seen) == 9


def test_initial_scores_kept_pairs_without_logps_once():
    """`initial` on pairs from a file (none new, no logps): π_0 scores them all at t = 0 and
    none at t = 1; after an older checkpoint, only the NaN rows of kept_P2 are scored."""
    ref = make_reference("initial", num_prompts=4, loss_name="dpo", pairs_from_file=True)
    rows = [_pair_rows(p, 0) for p in range(4)]
    batch = Rows(*(np.stack([r[k] for r in rows]) for k in range(3)))
    idx, none_new = np.arange(4, dtype=np.int32), np.zeros(4, bool)
    expect = [INITIAL.w * _sum(p, 0) for p in range(4)]
    scorer = FakeScorer()
    for t in range(2):
        got = ref.logps(scorer, batch, idx, none_new, pi_t=PI[t], initial=INITIAL)
        np.testing.assert_allclose(got, expect, rtol=1e-6)
    assert scorer.calls == [("initial", 4)]
    # resumed from a checkpoint that kept logps for prompts 0 and 2 only (stand-in values)
    ref = InitialReference(4)
    ref.kept_P2[[0, 2]] = [[-1.0, -2.0], [-3.0, -4.0]]
    scorer = FakeScorer()
    got = ref.logps(scorer, batch, idx, none_new, pi_t=PI[1], initial=INITIAL)
    np.testing.assert_allclose(
        got, [[-1.0, -2.0], expect[1], [-3.0, -4.0], expect[3]], rtol=1e-6)
    assert scorer.calls == [("initial", 2)]


def test_behavior_equals_current_when_every_pair_is_new():
    """With ρ = 1 (every pair new every iteration) `behavior` gives what `current` gives."""
    idx = np.arange(P, dtype=np.int32)
    cur = make_reference("current", num_prompts=P, loss_name="dpo", pairs_from_file=False)
    beh = make_reference("behavior", num_prompts=P, loss_name="dpo", pairs_from_file=False)
    for t in range(3):
        rows = [_pair_rows(p, t) for p in range(P)]
        batch = Rows(*(np.stack([r[k] for r in rows]) for k in range(3)))
        all_new = np.ones(P, bool)
        a = cur.logps(FakeScorer(), batch, idx, all_new, pi_t=PI[t], initial=None)
        b = beh.logps(FakeScorer(), batch, idx, all_new, pi_t=PI[t], initial=None)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(b, [PI[t].w * _sum(p, t) for p in range(P)], rtol=1e-6)


def test_behavior_stops_on_a_kept_pair_without_logps():
    """`behavior`: a kept pair with no logps (e.g. an older checkpoint) raises a one-line
    RunError naming the pair's place in D_t and optune.reference=behavior."""
    ref = BehaviorReference(P)
    idx = np.array([0, 2, 5], np.int32)
    rows = [_pair_rows(int(p), 0) for p in idx]
    batch = Rows(*(np.stack([r[k] for r in rows]) for k in range(3)))
    ref.kept_P2[0] = [-1.0, -2.0]  # prompt 0 kept with logps; prompt 2 new; prompt 5 kept, none
    scorer = FakeScorer()
    with pytest.raises(RunError) as info:
        ref.logps(scorer, batch, idx, np.array([False, True, False]), pi_t=PI[1], initial=None)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("pair 2 ") and "optune.reference=behavior" in msg


@pytest.mark.parametrize("loss", ["dpo", "wdpo", "ipo", "hinge", "hypo"])
@pytest.mark.parametrize("name", ["current", "behavior", "initial"])
def test_make_reference_fits_loss(name, loss):
    """HyPO's loss (the only one with online samples, KL to π_0) takes only `initial`; the
    other losses take every choice."""
    if loss == "hypo" and name != "initial":
        with pytest.raises(RunError) as info:
            make_reference(name, num_prompts=3, loss_name=loss, pairs_from_file=False)
        assert str(info.value) == (
            f"optune.reference={name} does not fit loss.name=hypo: its KL term is to the "
            "initial policy; allowed: initial")
        return
    ref = make_reference(name, num_prompts=3, loss_name=loss, pairs_from_file=False)
    expected = {"current": ReferencePolicy, "behavior": BehaviorReference,
                "initial": InitialReference}[name]
    assert type(ref) is expected and ref.name == name
    assert ref.needs_initial == (name == "initial")
    assert ref.kept_P2.shape == (3, 2) and ref.kept_P2.dtype == np.float32
    assert np.isnan(ref.kept_P2).all()


def test_make_reference_behavior_needs_generated_pairs():
    """`behavior` with pairs from data.offline_files is a one-line RunError; `current` and
    `initial` take file pairs."""
    with pytest.raises(RunError) as info:
        make_reference("behavior", num_prompts=3, loss_name="dpo", pairs_from_file=True)
    assert str(info.value) == (
        "optune.reference=behavior needs the policy that generated each pair; pairs from "
        "data.offline_files have none known; allowed: current, initial")
    assert type(make_reference("current", num_prompts=3, loss_name="dpo",
                               pairs_from_file=True)) is ReferencePolicy
    assert type(make_reference("initial", num_prompts=3, loss_name="hypo",
                               pairs_from_file=True)) is InitialReference


@pytest.mark.parametrize("name", ["fixed", "Current", ""])
def test_make_reference_unknown_name(name):
    """An unknown optune.reference is a one-line RunError listing the three choices."""
    with pytest.raises(RunError) as info:
        make_reference(name, num_prompts=3, loss_name="dpo", pairs_from_file=False)
    assert str(info.value) == f"optune.reference={name}: allowed: current, behavior, initial"

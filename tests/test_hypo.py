"""HyPO's online-sample hook (`optune_jax.hypo`) with a fake generator and reference: when it
draws, what it asks the generator for, how the samples are laid out, masked, scored and counted."""

import types

import numpy as np
import pytest

from optune_jax.batch import PairBatch
from optune_jax.hypo import OnlineSampleHook
from optune_jax.prompts import PromptSet
from optune_jax.run.schema import HypoSection
from sampling import Generation

PAD = 0
PROMPT_LEN = 5
Y = 4  # the fake responses' token budget
# every prompt starts with the set's shared prefix (2,)
PROMPTS = PromptSet(
    ids=[[2, 5, 6], [2, 8], [2, 10, 11, 12], [2, 14, 15]], rows=[{}] * 4, stats={}, prefix=(2,)
)
PROMPT_IDX = np.array([3, 0, 2, 1, 0, 2, 3, 1])  # [Q]: the prompt of each pair of D_t
STATE = "the train state"
POLICY_PARAMS = "π_θ's weights"
REF_PARAMS = "π_0's weights"


class FakeGenerator:
    """Generator's call signature; response s to prompt n of call c (from 1) is
    [c, ids[n], s, 9] cut to 2 + (n + s) % 3 tokens, then PAD. Records every call."""

    def __init__(self):
        self.policy = types.SimpleNamespace(pad_id=PAD)
        self.calls = []

    def __call__(self, params, prompts, ids, **kwargs):
        c = len(self.calls) + 1
        n, s = len(prompts), kwargs["num_samples"]
        tokens = np.full((n, s, Y), PAD, np.int32)
        lengths = (2 + (np.arange(n)[:, None] + np.arange(s)[None]) % 3).astype(np.int32)
        for i in range(n):
            for j in range(s):
                tokens[i, j, : lengths[i, j]] = [c, ids[i], j, 9][: lengths[i, j]]
        gen = Generation(
            tokens=tokens, lengths=lengths, finished=np.zeros((n, s), bool),
            logps=np.zeros((n, s, Y), np.float32), tokens_generated=int(lengths.sum()),
            max_cache_bytes=0, shapes=set(), compile_seconds=0.5 if c == 1 else 0.25,
        )
        self.calls.append(dict(params=params, prompts=[list(p) for p in prompts],
                               ids=np.array(ids), gen=gen, **kwargs))
        return gen


class FakeRefLogps:
    """A reference whose 'logp' of a row is the sum of its response tokens; records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, params, tokens, attn, resp):
        self.calls.append(dict(params=params, tokens=tokens, attn=attn, resp=resp))
        return (tokens * resp).sum(-1).astype(np.float32)


def expected_rows(prompts, gen):
    """(tokens, attn, resp) [N, S, T] written out by hand: prompt left-padded to PROMPT_LEN,
    then the response, PAD after it."""
    n, s = gen.lengths.shape
    tokens = np.full((n, s, PROMPT_LEN + Y), PAD, np.int32)
    attn = np.zeros_like(tokens)
    resp = np.zeros_like(tokens)
    for i, prompt in enumerate(prompts):
        for j in range(s):
            k = int(gen.lengths[i, j])
            row = [PAD] * (PROMPT_LEN - len(prompt)) + prompt + list(gen.tokens[i, j, :k])
            tokens[i, j, : len(row)] = row
            attn[i, j, PROMPT_LEN - len(prompt) : PROMPT_LEN + k] = 1
            resp[i, j, PROMPT_LEN : PROMPT_LEN + k] = 1
    return tokens, attn, resp


def step_batch(a, m, step):
    """A host PairBatch [A, M] for one step (the hook reads only its pair_mask)."""
    rng = np.random.default_rng(step)
    t = PROMPT_LEN + 3
    mask = np.ones((a, m), bool)
    mask.flat[step % (a * m)] = False  # a different masked pair each step
    return PairBatch(
        tokens=rng.integers(1, 50, (a, m, 2, t)).astype(np.int32),
        attn=np.ones((a, m, 2, t), np.int32),
        resp=np.ones((a, m, 2, t), np.int32),
        ref_logps=rng.normal(size=(a, m, 2)).astype(np.float32),
        rewards=rng.normal(size=(a, m, 2)).astype(np.float32),
        pair_mask=mask,
    )


def make_hook(every, samples=3, micro_batches=2, t=5):
    gen, ref = FakeGenerator(), FakeRefLogps()
    hook = OnlineSampleHook(
        HypoSection(samples_per_prompt=samples, every=every), seed=17, prompt_len=PROMPT_LEN,
        micro_batches=micro_batches, generator=gen, ref_logps=ref, prompts=PROMPTS,
        policy_params=lambda state: (POLICY_PARAMS, state), ref_params=REF_PARAMS,
        prompt_idx=PROMPT_IDX, t=t,
    )
    return hook, gen, ref


STEP_IDX = [np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7])]  # pairs of D_t per step (2 a epoch)


@pytest.mark.parametrize("every, draws", [(1, [0, 1, 2, 3, 4]), (2, [0, 2, 4]), (3, [0, 3])])
def test_draws_on_every_nth_step_and_reuses_masked_samples_between(every, draws):
    """A draw exactly on steps 0, every, 2·every...; its mask is the pairs' mask; the other steps
    carry the last draw's samples with the mask all False, and the pairs themselves unchanged."""
    hook, gen, ref = make_hook(every)
    last = None
    for step in range(5):
        idx = STEP_IDX[step % 2]
        batch = step_batch(2, 2, step)
        out = hook(idx, batch, STATE, step)
        drawn_so_far = sum(d <= step for d in draws)
        assert len(gen.calls) == len(ref.calls) == drawn_so_far
        if step in draws:
            np.testing.assert_array_equal(out.samples.mask, batch.pair_mask)
            assert not out.samples.mask.all() and out.samples.mask.any()
            last = out.samples
        else:
            np.testing.assert_array_equal(out.samples.mask, np.zeros((2, 2), bool))
            for x, y in zip((out.samples.tokens, out.samples.ref_logps),
                            (last.tokens, last.ref_logps), strict=True):
                np.testing.assert_array_equal(x, y)
        for field in ("tokens", "attn", "resp", "ref_logps", "rewards", "pair_mask"):
            np.testing.assert_array_equal(getattr(out, field), getattr(batch, field))
    assert len(gen.calls) == len(draws)


def test_a_draw_asks_for_exact_fresh_samples_of_the_steps_prompts():
    """The generator gets π_θ's weights, the step's prompts, ids offset by step × #prompts,
    the run seed, iteration t, S samples, the set's prefix and temperature 1, top_p 1, top_k 0."""
    hook, gen, _ = make_hook(every=2, samples=3, t=5)
    for step in range(5):
        hook(STEP_IDX[step % 2], step_batch(2, 2, step), STATE, step)
    assert len(gen.calls) == 3  # steps 0, 2, 4
    for call, step in zip(gen.calls, (0, 2, 4), strict=True):
        prompt_idx = PROMPT_IDX[STEP_IDX[step % 2]]
        assert call["params"] == (POLICY_PARAMS, STATE)
        assert call["prompts"] == [PROMPTS.ids[i] for i in prompt_idx]
        np.testing.assert_array_equal(call["ids"], prompt_idx + 4 * step)
        assert call["seed"] == 17 and call["iteration"] == 5 and call["num_samples"] == 3
        assert tuple(call["prefix"]) == (2,)
        assert call["temperature"] == 1.0 and call["top_p"] == 1.0 and call["top_k"] == 0
        assert not call.get("greedy", False)
    # steps 0 and 4 draw the same pairs' prompts with different ids: fresh samples
    assert gen.calls[0]["prompts"] == gen.calls[2]["prompts"]
    assert not np.array_equal(gen.calls[0]["ids"], gen.calls[2]["ids"])


@pytest.mark.parametrize("micro_batches", [1, 2, 4])
def test_samples_are_the_drawn_rows_shaped_by_micro_batch_and_scored_under_pi0(micro_batches):
    """Samples are the drawn responses laid out after their left-padded prompts, shaped
    [A, 4/A, S, T], with the reference's logps of exactly those rows under π_0's weights."""
    s = 3
    hook, gen, ref = make_hook(every=1, samples=s, micro_batches=micro_batches)
    m = 4 // micro_batches
    for step in range(2):
        out = hook(STEP_IDX[step], step_batch(micro_batches, m, step), STATE, step)
        call = gen.calls[-1]
        tokens, attn, resp = expected_rows(call["prompts"], call["gen"])
        shape = (micro_batches, m, s, PROMPT_LEN + Y)
        for got, want in zip((out.samples.tokens, out.samples.attn, out.samples.resp),
                             (tokens, attn, resp), strict=True):
            assert got.shape == shape
            np.testing.assert_array_equal(got, want.reshape(shape))
        # the tokens encode the call and the prompt id: this step's draw, row by row
        np.testing.assert_array_equal(out.samples.tokens[..., PROMPT_LEN],
                                      np.full((micro_batches, m, s), step + 1))
        np.testing.assert_array_equal(out.samples.tokens[..., PROMPT_LEN + 1],
                                      np.repeat(call["ids"], s).reshape(micro_batches, m, s))
        assert ref.calls[-1]["params"] == REF_PARAMS
        np.testing.assert_array_equal(ref.calls[-1]["tokens"], tokens)
        want_logps = np.array([[sum(call["gen"].tokens[i, j, : call["gen"].lengths[i, j]])
                                for j in range(s)] for i in range(4)], np.float32)
        assert out.samples.ref_logps.shape == (micro_batches, m, s)
        np.testing.assert_array_equal(out.samples.ref_logps, want_logps.reshape(-1, m, s))


def test_counts_add_up_over_draws():
    """`counts` sum prompts, responses (prompts × S), generated tokens and compile seconds over
    the draws only; the reused steps add nothing."""
    hook, gen, _ = make_hook(every=2, samples=3)
    for step in range(5):
        hook(STEP_IDX[step % 2], step_batch(2, 2, step), STATE, step)
    # 3 draws of 4 prompts, 3 responses each; the fake's lengths 2 + (n + s) % 3 sum to 36
    # per draw; compile seconds 0.5 on the fake's first call and 0.25 after
    assert hook.counts["prompts_regenerated"] == 12
    assert hook.counts["responses_generated"] == 36
    assert hook.counts["tokens_generated"] == 3 * 36
    assert hook.counts["compile_seconds"] == pytest.approx(1.0)
    assert hook.counts["seconds"] >= 0.0
    assert sum(c["gen"].tokens_generated for c in gen.calls) == 108

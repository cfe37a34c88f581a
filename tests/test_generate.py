"""The generation phase (`optune_jax.generate`): the run's `sampling.*` settings reach the
sampler, overrides replace them, greedy answers are the argmax continuation, compile seconds are
counted per new program, and `is_exact` tells exact draws of the policy apart."""

import functools

import jax
import numpy as np

from models import forward, init_params
from optune_jax import sharding
from optune_jax.components import Policy, random_architecture
from optune_jax.generate import EXACT, Generator, is_exact
from optune_jax.run.schema import RandomModel, SamplingSection
from sampling import SamplingOptions, sample_prompts

# a tiny architecture no other test file uses (its programs compile here first)
CONFIG = random_architecture(
    RandomModel(
        vocab_size=72,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
)
EOS, PAD = (3,), 0
PROMPT_LEN = 12
PREFIX = (5, 6)
# different lengths, all continuing PREFIX
PROMPTS = [[5, 6, 9, 17, 30], [5, 6, 41], [5, 6, 12, 60, 7, 22, 33, 48, 11], [5, 6, 70, 8]]
IDS = np.array([4, 11, 2, 7])
SECTION = SamplingSection(
    max_new_tokens=6, temperature=0.7, top_p=0.85, top_k=9, batch_size=2, pack_prompts=False
)


@functools.cache
def params():
    """Random weights of CONFIG drawn with NumPy (init_params would compile its layer scan)."""
    rng = np.random.default_rng(3)
    abstract = jax.eval_shape(lambda: init_params(CONFIG, jax.random.key(0)))
    return jax.tree.map(lambda x: rng.normal(0.0, 0.5, x.shape).astype(np.float32), abstract)


def generator(mesh_shape=(1, 1, 1), eos_ids=EOS):
    """A Generator on a mesh of `mesh_shape`, with the weights in its training layout."""
    layout = sharding.Layout(sharding.make_mesh(mesh_shape))
    policy = Policy(CONFIG, tokenizer=None, eos_ids=eos_ids, pad_id=PAD)
    gen = Generator(SECTION, policy, layout, "float32", PROMPT_LEN, progress=False)
    trained = jax.device_put(params(), sharding.param_shardings(CONFIG, layout))
    return gen, trained


@functools.cache
def reference():
    """`sample_prompts` called directly (no mesh, no decode layout) with SECTION's settings
    written out by hand and 3 samples each."""
    opts = SamplingOptions(
        max_new_tokens=6, eos_ids=EOS, pad_id=PAD, num_samples=3,
        temperature=0.7, top_p=0.85, top_k=9,
    )
    return sample_prompts(
        params(), PROMPTS, IDS, config=CONFIG, opts=opts, seed=13, iteration=2, batch_size=2,
        max_prompt_len=PROMPT_LEN, shared_prefix=PREFIX, pack=False,
    )


@functools.cache
def sharded_calls():
    """(first, again): the same call twice of a Generator on a (1, 2, 1) mesh (batch and kv
    heads split over 2 devices), with the section's settings and 3 samples per prompt."""
    gen, trained = generator((1, 2, 1))
    call = lambda: gen(  # noqa: E731
        trained, PROMPTS, IDS, seed=13, iteration=2, num_samples=3, desc="t", prefix=PREFIX
    )
    return call(), call()


def test_generator_samples_what_sample_prompts_samples_with_the_sections_settings():
    """The section's temperature/top_p/top_k, budget and batch size and the prompt length reach
    the sampler: a sharded Generator's tokens, lengths, logps and batch shapes equal a direct
    `sample_prompts` call's."""
    got, again = sharded_calls()
    want = reference()
    assert got.tokens.shape == (4, 3, 6)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.finished, want.finished)
    # logps are under the tempered, truncated distribution: other settings give other values
    np.testing.assert_allclose(got.logps, want.logps, rtol=1e-5, atol=1e-5)
    assert got.tokens_generated == int(want.lengths.sum())
    # batches of 2 prompts (batch_size), prompts padded to PROMPT_LEN - len(PREFIX) columns
    assert got.shapes == want.shapes == {(2, PROMPT_LEN - len(PREFIX), 0)}
    np.testing.assert_array_equal(again.tokens, want.tokens)


def test_compile_seconds_count_a_new_shape_once():
    """The first call of a shape reports compile seconds; the same call again reports none."""
    first, again = sharded_calls()
    assert first.compile_seconds > 0
    assert again.compile_seconds == 0.0


@functools.partial(jax.jit, static_argnames="config")
def _logits(params, tokens, mask, config):
    return forward(params, tokens, mask, config=config)


def brute_force_greedy(prompts, max_new, width=16):
    """Argmax continuations: at every step a full forward pass (no cache) over each whole
    sequence, right-padded to `width` columns; `max_new` tokens each, no EOS."""
    seqs = [list(p) for p in prompts]
    for _ in range(max_new):
        tokens = np.zeros((len(seqs), width), np.int32)
        mask = np.zeros((len(seqs), width), np.int32)
        for i, seq in enumerate(seqs):
            tokens[i, : len(seq)], mask[i, : len(seq)] = seq, 1
        logits = np.asarray(_logits(params(), tokens, mask, CONFIG))
        for i, seq in enumerate(seqs):
            seq.append(int(np.argmax(logits[i, len(seq) - 1])))
    return [seq[len(p) :] for seq, p in zip(seqs, prompts, strict=True)]


def test_greedy_override_gives_the_argmax_continuation_of_each_prompt():
    """`greedy=True`, `max_new` and `batch` override the section: each prompt (left-padded beside
    longer ones) gets the brute-force argmax answer, cut at the policy's EOS."""
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[0]]  # 3, 9 and 5 tokens
    max_new = 5
    free = brute_force_greedy(prompts, max_new)
    # as EOS the first new token of the first answer after its start: that answer stops there
    k = next(k for k in range(1, max_new) if free[0][k] not in free[0][:k])
    eos = free[0][k]
    want = [ans[: ans.index(eos) + 1] if eos in ans else ans for ans in free]
    assert len(want[0]) == k + 1 < max_new and any(len(w) == max_new for w in want)
    gen, trained = generator(eos_ids=(eos,))
    got = gen(trained, prompts, np.arange(3), seed=0, iteration=0, num_samples=1, desc="",
              prefix=(), max_new=max_new, batch=4, greedy=True)
    assert got.tokens.shape == (3, 1, max_new)
    # `batch` overrides the section's 2: one batch of 4 rows, unpacked (pack_prompts False)
    assert got.shapes == {(4, PROMPT_LEN, 0)}
    for i, ans in enumerate(want):
        n = len(ans)
        assert got.lengths[i, 0] == n
        assert got.finished[i, 0] == (ans[-1] == eos)
        np.testing.assert_array_equal(got.tokens[i, 0, :n], ans)
        np.testing.assert_array_equal(got.tokens[i, 0, n:], PAD)


def test_no_prompts_give_empty_arrays_of_the_right_shapes():
    """An empty prompt list returns [0, S, Y] / [0, S] arrays, no tokens and no programs."""
    gen, trained = generator()
    got = gen(trained, [], np.zeros((0,), np.int64), seed=0, iteration=0, num_samples=3,
              desc="", prefix=())
    assert got.tokens.shape == (0, 3, SECTION.max_new_tokens)
    assert got.logps.shape == (0, 3, SECTION.max_new_tokens)
    assert got.lengths.shape == got.finished.shape == (0, 3)
    assert got.tokens.dtype == np.int32 and got.lengths.dtype == np.int32
    assert got.tokens_generated == 0 and got.shapes == set() and got.compile_seconds == 0.0


def test_is_exact_only_for_temperature_1_and_no_truncation():
    """Only temperature 1, top_p 1 and top_k 0 together are exact draws of the policy."""
    assert EXACT == {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    exact = SamplingSection(temperature=1.0, top_p=1.0, top_k=0)
    assert is_exact(exact)
    assert not is_exact(SamplingSection())  # the default top_p 0.9 truncates
    for change in ({"temperature": 0.7}, {"temperature": 1.3}, {"top_p": 0.95}, {"top_k": 5}):
        assert not is_exact(SamplingSection(**{**dict(temperature=1.0, top_p=1.0), **change}))
    # the other fields do not matter
    assert is_exact(SamplingSection(top_p=1.0, max_new_tokens=3, batch_size=1, num_samples=4))

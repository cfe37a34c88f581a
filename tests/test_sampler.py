"""The sampler: greedy parity with transformers, exact truncation, batching independence."""

import dataclasses
import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings

from models import ModelConfig, decode_step, init_params, prefill
from models.hf_io import load_hf_checkpoint
from sampling import (
    SamplingOptions,
    common_prefix,
    generate,
    kv_cache_bytes,
    sample_prompts,
    sampling_logprobs,
)
from sampling.batching import pack_rows, packed_lines
from sampling.sampler import draw_next
from sampling.truncation import draw, draw_path
from tests.test_train_step import CONFIG as TINY_CONFIG


@functools.cache
def _params96():
    """Random parameters of TINY_CONFIG with 96 tokens, for every sliding window (the window
    does not change the parameters): init_params compiles its layer scan on each call."""
    return init_params(dataclasses.replace(TINY_CONFIG, vocab_size=96), jax.random.key(4))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(1)
    hf = transformers.MistralForCausalLM(
        transformers.MistralConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=6,
            max_position_embeddings=128,
            eos_token_id=3,
            pad_token_id=0,
            bos_token_id=1,
        )
    ).eval()
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    config, params = load_hf_checkpoint(path)
    return hf, config, params


def test_greedy_matches_transformers_generate_with_sliding_window(tiny):
    hf, config, params = tiny
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(4, 96, size=n)) for n in (3, 9, 5)]
    opts = SamplingOptions(max_new_tokens=12, eos_ids=(3,), pad_id=0, num_samples=1, greedy=True)
    ours = sample_prompts(
        params,
        prompts,
        [0, 1, 2],
        config=config,
        opts=opts,
        seed=0,
        iteration=0,
        batch_size=4,
        max_prompt_len=16,
    )
    for i, p in enumerate(prompts):
        with torch.no_grad():
            want = hf.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p)),
                do_sample=False,
                max_new_tokens=12,
                eos_token_id=3,
                pad_token_id=0,
            )[0, len(p) :].numpy()
        n = ours.lengths[i, 0]
        np.testing.assert_array_equal(ours.tokens[i, 0, :n], want[:n])
        assert n == len(want) or want[n] == 0  # transformers pads finished rows too
    # the window bounds the cache: 6 slots, not prompt + budget
    assert ours.max_cache_bytes == kv_cache_bytes(config, 4, 6)


def numpy_truncated(logits, temperature, top_k, top_p):
    """Independent reference: sort, keep top-k, keep the smallest head with mass >= p."""
    z = logits / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros_like(z, bool)
    keep[order[: top_k or len(z)]] = True
    p = np.exp(z - z.max()) * keep
    p /= p.sum()
    cum = np.cumsum(p[order])
    head = order[: int(np.searchsorted(cum, top_p - 1e-12) + 1)]
    out = np.zeros_like(p)
    out[head] = p[head]
    return out / out.sum()


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 0.9), (1.0, 4, 1.0), (0.7, 5, 0.8), (1.3, 0, 0.5)]
)
def test_truncated_sampling_frequencies_match_reference(temperature, top_k, top_p):
    logits = np.log(np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.015, 0.005]))
    want = numpy_truncated(logits, temperature, top_k, top_p)
    n = 40_000
    opts = SamplingOptions(
        max_new_tokens=1, eos_ids=(0,), pad_id=0, temperature=temperature, top_k=top_k, top_p=top_p
    )
    keys = jax.random.split(jax.random.key(7), n)
    tokens, logps = jax.jit(lambda k, z: draw_next(k, 0, z, opts))(
        keys, jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    )
    freq = np.bincount(np.asarray(tokens), minlength=len(logits)) / n
    # outside the nucleus: never drawn; inside: within 5 standard errors of the reference
    assert np.all(freq[want == 0] == 0)
    tol = 5 * np.sqrt(want * (1 - want) / n) + 1e-9
    assert np.all(np.abs(freq - want) <= tol), (freq, want)
    np.testing.assert_allclose(np.exp(logps), want[np.asarray(tokens)], rtol=1e-5)


def test_truncation_keeps_at_least_one_token():
    logits = jnp.asarray([[5.0, 0.0, -1.0]])
    logp = sampling_logprobs(logits, temperature=1.0, top_k=0, top_p=1e-6)
    np.testing.assert_allclose(np.exp(logp), [[1.0, 0.0, 0.0]], atol=1e-7)


def test_samples_do_not_depend_on_batching(tiny):
    _, config, params = tiny
    rng = np.random.RandomState(3)
    prompts = [list(rng.randint(4, 96, size=n)) for n in rng.randint(2, 14, size=10)]
    ids = list(range(100, 110))
    opts = SamplingOptions(
        max_new_tokens=10, eos_ids=(3,), pad_id=0, num_samples=2, temperature=1.0, top_p=0.9
    )
    common = dict(config=config, opts=opts, seed=5, iteration=2, max_prompt_len=16)
    full = sample_prompts(params, prompts, ids, batch_size=8, **common)
    subset = [1, 4, 7]  # "regenerate 30 %": alone, in a smaller batch
    part = sample_prompts(
        params, [prompts[i] for i in subset], [ids[i] for i in subset], batch_size=2, **common
    )
    np.testing.assert_array_equal(part.tokens, full.tokens[subset])
    np.testing.assert_array_equal(part.lengths, full.lengths[subset])
    np.testing.assert_allclose(part.logps, full.logps[subset], atol=1e-5)
    # and the draws do depend on the seed, the iteration and the sample index
    other = sample_prompts(params, prompts, ids, batch_size=8, **{**common, "iteration": 3})
    assert not np.array_equal(other.tokens, full.tokens)
    assert not np.array_equal(full.tokens[:, 0], full.tokens[:, 1])


def test_outputs_are_padded_after_eos_and_consistent(tiny):
    _, config, params = tiny
    opts = SamplingOptions(
        max_new_tokens=16, eos_ids=(3, 5, 7, 11), pad_id=0, num_samples=4, temperature=2.0
    )
    gen = sample_prompts(
        params,
        [[9, 8, 10], [12, 13]],
        [0, 1],
        config=config,
        opts=opts,
        seed=0,
        iteration=0,
        batch_size=2,
        max_prompt_len=16,
    )
    for p in range(2):
        for s in range(4):
            n = gen.lengths[p, s]
            assert np.all(gen.tokens[p, s, n:] == 0) and np.all(gen.logps[p, s, n:] == 0)
            assert np.all(gen.logps[p, s, :n] < 0)
            ends_in_eos = n > 0 and gen.tokens[p, s, n - 1] in opts.eos_ids
            assert gen.finished[p, s] == ends_in_eos
            assert gen.finished[p, s] or n == 16
    assert gen.tokens_generated == gen.lengths.sum()


def test_generation_stops_when_every_row_has_finished():
    config = ModelConfig(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    params = init_params(config, jax.random.key(0))
    opts = SamplingOptions(max_new_tokens=64, eos_ids=tuple(range(16)), pad_id=0, num_samples=2)
    out = generate(
        params,
        jnp.ones((2, 4), jnp.int32),
        jnp.ones((2, 4), jnp.int32),
        jnp.arange(2),
        0,
        0,
        config=config,
        opts=opts,
    )
    assert np.all(np.asarray(out.lengths_BS) == 1) and np.all(np.asarray(out.finished_BS))
    assert int(out.steps) == 1  # the loop ended, it did not pad on to the budget


def test_a_long_run_compiles_a_handful_of_programs(tiny):
    _, config, params = tiny
    opts = SamplingOptions(max_new_tokens=4, eos_ids=(3,), pad_id=0)
    rng = np.random.RandomState(0)
    before = generate._cache_size()
    shapes = set()
    for call in range(12):
        count = rng.randint(1, 9)
        prompts = [list(rng.randint(4, 96, size=rng.randint(1, 40))) for _ in range(count)]
        gen = sample_prompts(
            params,
            prompts,
            list(range(count)),
            config=config,
            opts=opts,
            seed=0,
            iteration=call,
            batch_size=8,
            max_prompt_len=40,
        )
        shapes |= gen.shapes
    compiled = generate._cache_size() - before
    # one program per bucket shape, batch {1,2,4,8} x length {16,24,32,40} (the window's ring
    # buffer leaves them unpacked): never one per call's raw shape
    assert compiled == len(shapes) <= 12
    assert all(b in (1, 2, 4, 8) and t in (16, 24, 32, 40) and not n for b, t, n in shapes)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (7, 1.0), (20, 0.5), (0, 0.3)])
def test_truncated_support_equals_sorting_reference_on_wide_vocabularies(top_k, top_p):
    # the bisection cut-off keeps exactly the tokens a full sort keeps
    logits = np.asarray(jax.random.normal(jax.random.key(top_k), (16, 3000)) * 3.0)
    got = np.isfinite(
        np.asarray(
            sampling_logprobs(jnp.asarray(logits), temperature=0.8, top_k=top_k, top_p=top_p)
        )
    )
    for row in range(16):
        want = numpy_truncated(logits[row].astype(np.float64), 0.8, top_k, top_p) > 0
        np.testing.assert_array_equal(got[row], want, err_msg=f"row {row}")


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (20, 0.8), (300, 0.95), (0, 0.3), (50, 1.0)])
def test_candidate_draws_follow_the_full_truncated_distribution(top_k, top_p):
    # rows whose support fits in the 256 candidates (peaked) and rows that fall back to the
    # full vocabulary (flat), in one batch; u on a fine grid makes the inverse-CDF frequencies
    # deterministic: each token's share of the grid is its probability to within 1/N
    n, v, temperature = 4000, 3000, 0.8
    rng = np.random.RandomState(top_k)
    peaked, flat = rng.normal(size=v) * 4.0, rng.normal(size=v) * 0.05
    u = (np.arange(n) + 0.5) / n
    logits = np.concatenate([np.tile(peaked, (n, 1)), np.tile(flat, (n, 1))]).astype(np.float32)
    tokens, logps = jax.jit(
        lambda u, z: draw(u, z, temperature=temperature, top_k=top_k, top_p=top_p)
    )(jnp.asarray(np.concatenate([u, u]), jnp.float32), jnp.asarray(logits))
    tokens, logps = np.asarray(tokens), np.asarray(logps)
    for rows, z in ((slice(0, n), peaked), (slice(n, 2 * n), flat)):
        want = numpy_truncated(z.astype(np.float32).astype(np.float64), temperature, top_k, top_p)
        assert np.all(want[tokens[rows]] > 0)  # never outside the truncated support
        np.testing.assert_allclose(np.exp(logps[rows]), want[tokens[rows]], rtol=2e-4)
        freq = np.bincount(tokens[rows], minlength=v) / n
        assert np.abs(freq - want).max() <= 1.0 / n + 1e-6
    kept = (
        numpy_truncated(peaked.astype(np.float32).astype(np.float64), temperature, top_k, top_p) > 0
    ).sum()
    assert kept < 256  # the peaked rows did take the candidate path


def test_a_rows_draw_does_not_depend_on_its_neighbours_falling_back():
    # 17 rows: one whose support fits the candidates, 16 that fall back to the full vocabulary
    # in chunks of 2 (the last chunk clamped); each row must get what it gets alone
    rng = np.random.RandomState(0)
    logits = rng.normal(size=(17, 2000)) * 0.05
    logits[0] = rng.normal(size=2000) * 4.0
    logits = jnp.asarray(logits, jnp.float32)
    u = jnp.asarray(rng.uniform(size=17), jnp.float32)
    fn = jax.jit(lambda u, z: draw(u, z, temperature=1.0, top_k=0, top_p=0.9))
    together = fn(u, logits)
    for row in range(17):
        alone = fn(u[row : row + 1], logits[row : row + 1])
        assert int(alone[0][0]) == int(together[0][row]), row
        # to rounding: XLA's CPU may sum a row in another order for another batch shape
        np.testing.assert_allclose(alone[1][0], together[1][row], rtol=1e-6, err_msg=str(row))


# ------------------------------------------------------------------------------- draw paths
PATHS = ["candidates", "sort", "bisect"]  # `draw_path("auto")` picks one per backend


def _grid_draw(logits_V, n, path, **trunc):
    """Tokens and logps at n evenly spaced u: each token's share is its probability to 1/n."""
    u = jnp.asarray((np.arange(n) + 0.5) / n, jnp.float32)
    z = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
    tokens, logps = jax.jit(lambda u, z: draw(u, z, path=path, **trunc))(u, z)
    return np.asarray(tokens), np.asarray(logps)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 0.9), (1.0, 4, 1.0), (0.7, 5, 0.8), (1.3, 0, 0.5), (0.8, 0, 1.0)],
)
def test_every_draw_path_matches_the_sorting_reference(temperature, top_k, top_p, path):
    # ten likely tokens among 256 near-impossible ones, shuffled: more tokens than candidates
    logits = np.log([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.015, 0.005])
    shuffle = np.random.RandomState(0).permutation(266)
    logits = np.concatenate([logits, np.full(256, -50.0)])[shuffle]
    want = numpy_truncated(logits.astype(np.float32).astype(np.float64), temperature, top_k, top_p)
    n = 2000
    tokens, logps = _grid_draw(logits, n, path, temperature=temperature, top_k=top_k, top_p=top_p)
    assert np.all(want[tokens] > 0)
    assert np.abs(np.bincount(tokens, minlength=266) / n - want).max() <= 1.0 / n + 1e-6
    np.testing.assert_allclose(np.exp(logps), want[tokens], rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_every_draw_path_keeps_every_token_tied_at_the_cut(path):
    # 0.4 then three tokens tied at 0.2: top-k 2 keeps all three ties with the 2nd; top-p 0.5
    # keeps them too (each has 0.4 < 0.5 strictly more likely mass above it)
    logits = np.full(300, -50.0)
    logits[40], logits[[7, 150, 299]] = np.log(0.4), np.log(0.2)
    want = np.zeros(300)
    want[40], want[[7, 150, 299]] = 0.4, 0.2
    for top_k, top_p in ((2, 1.0), (0, 0.5)):
        tokens, _ = _grid_draw(logits, 1000, path, temperature=1.0, top_k=top_k, top_p=top_p)
        assert np.abs(np.bincount(tokens, minlength=300) / 1000 - want).max() <= 1e-3 + 1e-6


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(0.8, 0, 0.9), (1.3, 20, 0.8), (1.0, 300, 0.95)]
)
def test_every_draw_path_draws_the_same_token_for_the_same_u(temperature, top_k, top_p):
    # the cumulative distribution runs in vocabulary order on every path; peaked rows draw
    # among the candidates, flat ones fall back to the whole vocabulary
    rng = np.random.RandomState(top_k)
    logits = rng.normal(size=(64, 1000)) * np.where(np.arange(64) % 2, 4.0, 0.05)[:, None]
    logits, u = jnp.asarray(logits, jnp.float32), jnp.asarray(rng.uniform(size=64), jnp.float32)
    trunc = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    got = {p: jax.jit(lambda u, z, p=p: draw(u, z, path=p, **trunc))(u, logits) for p in PATHS}
    for path in PATHS[1:]:
        np.testing.assert_array_equal(got[path][0], got["candidates"][0], err_msg=path)
        np.testing.assert_allclose(got[path][1], got["candidates"][1], atol=2e-6, err_msg=path)


def test_every_draw_path_compiles_and_agrees_across_devices():
    """The draw in a program over 8 devices, the vocabulary split (the decode layout) or the
    rows replicated: XLA's TopK decomposer runs there (it once aborted the process on the
    candidates' barrier); the tokens equal the one-device draw's."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    rng = np.random.RandomState(0)
    logits = jnp.asarray(rng.normal(size=(16, 1024)) * 3, jnp.float32)
    u = jnp.asarray(rng.uniform(size=16), jnp.float32)
    for path in PATHS:
        fn = jax.jit(lambda u, z, p=path: draw(u, z, temperature=1.0, top_k=0, top_p=0.9, path=p))
        want = fn(u, logits)[0]
        for spec in (PartitionSpec(None, "x"), PartitionSpec()):
            split = jax.device_put(logits, NamedSharding(mesh, spec))
            np.testing.assert_array_equal(fn(u, split)[0], want, err_msg=f"{path} {spec}")


@pytest.mark.optimized  # reads the optimised HLO
def test_the_sort_and_bisect_paths_have_no_data_dependent_loop():
    args = (jnp.zeros(4), jnp.zeros((4, 300)))

    def loops(path):
        fn = jax.jit(lambda u, z: draw(u, z, temperature=1.0, top_k=20, top_p=0.9, path=path))
        hlo = fn.lower(*args).compile().as_text()  # the optimised HLO
        return "while[" in str(jax.make_jaxpr(fn)(*args)), [
            line for line in hlo.splitlines() if " while(" in line
        ]

    assert loops("sort") == (False, [])  # no loop at all
    # two 32-step bisections: static-length scans (fori_loop with constant bounds), whose
    # trip count XLA knows, so a GPU runs them without reading a predicate back
    while_loop, whiles = loops("bisect")
    assert not while_loop and len(whiles) == 2
    assert all('"known_trip_count":{"n":"32"}' in line for line in whiles)
    # while the candidates' fallback loop has a trip count that depends on the data
    while_loop, whiles = loops("candidates")
    assert while_loop and any("known_trip_count" not in line for line in whiles)


def test_draw_path_auto_follows_the_backend_and_unknown_paths_are_refused():
    assert draw_path("auto") == ("candidates" if jax.default_backend() == "cpu" else "sort")
    assert draw_path("bisect") == "bisect"
    with pytest.raises(ValueError, match="draw path 'topk' is not one of"):
        draw_path("topk")
    with pytest.raises(ValueError, match="draw_path='topk' not in"):
        SamplingOptions(max_new_tokens=1, eos_ids=(0,), pad_id=0, draw_path="topk")


# ------------------------------------------------------------------------------- shared prefix
def _brute_common_prefix(prompts):
    n = 0
    while all(len(p) > n + 1 for p in prompts) and len({p[n] for p in prompts}) == 1:
        n += 1
    return tuple(prompts[0][:n]) if prompts else ()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), min_size=1, max_size=5))
def test_common_prefix_is_the_longest_shared_prefix_short_of_every_prompt(prompts):
    assert common_prefix(prompts) == _brute_common_prefix(prompts)


@pytest.mark.parametrize("window", [40, 8])  # 40 holds everything; 8 is too short: prompts whole
def test_shared_prefix_samples_equal_whole_prompts(window):
    config = dataclasses.replace(TINY_CONFIG, vocab_size=96, sliding_window=window)
    params = _params96()
    rng = np.random.RandomState(5)
    head = list(rng.randint(4, 96, size=9))
    prompts = [head + list(rng.randint(4, 96, size=n)) for n in (1, 6, 3, 12, 4)]
    prefix = common_prefix(prompts)
    assert len(prefix) >= 9
    ids = list(range(5))
    greedy = SamplingOptions(max_new_tokens=9, eos_ids=(3,), pad_id=0, num_samples=1, greedy=True)
    drawn = SamplingOptions(max_new_tokens=9, eos_ids=(3,), pad_id=0, num_samples=2, top_p=0.9)
    for opts in (greedy, drawn) if window == 40 else (drawn,):  # (8: the whole prompts' path)
        common = dict(config=config, opts=opts, seed=1, iteration=0, max_prompt_len=24)
        whole = sample_prompts(params, prompts, ids, batch_size=8, **common)
        shared = sample_prompts(params, prompts, ids, batch_size=8, shared_prefix=prefix, **common)
        np.testing.assert_array_equal(shared.tokens, whole.tokens)
        np.testing.assert_allclose(shared.logps, whole.logps, atol=1e-5)
        # the prefix's cache slots are counted once per row, like the whole prompts' were
        buckets = {t for _, t, _ in shared.shapes}
        if window == 8:
            assert shared.shapes == whole.shapes
        else:
            assert max(buckets) < min(t for _, t, _ in whole.shapes)
        # a subset regenerated alone draws what it drew in the full run
        part = sample_prompts(
            params, prompts[1:3], ids[1:3], batch_size=2, shared_prefix=prefix, **common
        )
        np.testing.assert_array_equal(part.tokens, shared.tokens[1:3])


def test_shared_prefix_prefill_matches_whole_prompt_prefill(tiny):
    _, config, params = tiny  # sliding window 6 > every sequence here: no eviction
    config = dataclasses.replace(config, sliding_window=None)
    prefix = np.array([5, 17, 33, 8], np.int32)
    suffixes = [[40, 41], [50], [60, 61, 62]]
    whole_BT = np.zeros((3, 7), np.int32)
    mask_whole = np.zeros_like(whole_BT)
    suffix_BT = np.zeros((3, 3), np.int32)
    mask_suffix = np.zeros_like(suffix_BT)
    for i, s in enumerate(suffixes):
        w = [*prefix, *s]
        whole_BT[i, 7 - len(w) :], mask_whole[i, 7 - len(w) :] = w, 1
        suffix_BT[i, 3 - len(s) :], mask_suffix[i, 3 - len(s) :] = s, 1
    want, want_cache = prefill(params, whole_BT, mask_whole, config=config, max_len=10)
    got, cache = prefill(
        params, suffix_BT, mask_suffix, config=config, max_len=10, prefix_F=jnp.asarray(prefix)
    )
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(cache.next_pos_B, want_cache.next_pos_B)
    token = jnp.argmax(want, axis=-1).astype(jnp.int32)
    for _ in range(3):  # the same continuation from either cache
        want, want_cache = decode_step(params, token, want_cache, config=config)
        got, cache = decode_step(params, token, cache, config=config)
        np.testing.assert_allclose(got, want, atol=1e-5)
        token = jnp.argmax(want, axis=-1).astype(jnp.int32)


def test_shared_prefix_rejects_prompts_that_do_not_continue_it(tiny):
    _, config, params = tiny
    opts = SamplingOptions(max_new_tokens=2, eos_ids=(3,), pad_id=0, num_samples=1)
    common = dict(config=config, opts=opts, seed=0, iteration=0, batch_size=2, max_prompt_len=8)
    with pytest.raises(ValueError, match="prompt 1 does not continue the shared prefix of 2"):
        sample_prompts(params, [[4, 5, 6], [4, 7, 6]], [0, 1], shared_prefix=(4, 5), **common)
    with pytest.raises(ValueError, match="prompt 0 does not continue"):  # nothing left of it
        sample_prompts(params, [[4, 5], [4, 5, 6]], [0, 1], shared_prefix=(4, 5), **common)


# ------------------------------------------------------------------------------- packed prefill
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12).flatmap(lambda t: st.tuples(
    st.just(t), st.lists(st.integers(1, t), min_size=1, max_size=40)
)))
def test_packed_rows_hold_every_token_once_in_order(case):
    t, lens = case
    lines = packed_lines(lens, t)
    step = max(1, len(lens) // 8)
    assert lines == 0 or (lines % step == 0 and 2 * lines < len(lens))
    assert lines == 0 or lines * 2 * t >= sum(lens)
    pack = pack_rows(lens, t, lines or len(lens))
    # brute force: read each row back from the lines
    for row, n in enumerate(lens):
        where = np.argwhere((pack >= row * t) & (pack < (row + 1) * t))
        assert len(set(where[:, 0])) == 1  # one line
        cols = where[:, 1]
        np.testing.assert_array_equal(cols, np.arange(cols[0], cols[0] + n))  # contiguous
        np.testing.assert_array_equal(pack[where[0, 0], cols], row * t + np.arange(t - n, t))
    assert (pack >= 0).sum() == sum(lens)


def test_pack_rows_rejects_rows_that_do_not_fit():
    with pytest.raises(ValueError, match="row lengths must be in 1..4; got 1..5"):
        pack_rows([1, 5], 4, 2)
    with pytest.raises(ValueError, match="3 rows need 2 lines; got 1"):
        pack_rows([4, 4, 1], 4, 1)


@pytest.mark.parametrize("prefix, window", [((), None), ((5, 17, 33, 8), 16)])
def test_packed_prefill_matches_padded_prefill(prefix, window):
    config = dataclasses.replace(TINY_CONFIG, vocab_size=96, sliding_window=window)
    params = _params96()
    rng = np.random.RandomState(0)
    lens, t = [3, 1, 5, 2, 6, 4, 1, 2], 6
    tokens = np.zeros((8, t), np.int32)
    mask = np.zeros_like(tokens)
    for row, n in enumerate(lens):
        tokens[row, t - n :], mask[row, t - n :] = rng.randint(4, 96, size=n), 1
    lines = packed_lines(lens, t)
    assert lines == 2  # 24 tokens fill 2 lines of 12 slots instead of 8 rows of 6
    fill = jax.jit(functools.partial(prefill, config=config, max_len=len(prefix) + t + 3))
    step = jax.jit(functools.partial(decode_step, config=config))
    prefix = jnp.asarray(prefix, jnp.int32) if prefix else None
    want, want_cache = fill(params, tokens, mask, prefix_F=prefix)
    got, cache = fill(params, tokens, mask, prefix_F=prefix, pack_GW=pack_rows(lens, t, lines))
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(cache.pos_BC, want_cache.pos_BC)
    np.testing.assert_array_equal(cache.next_pos_B, want_cache.next_pos_B)
    token = jnp.argmax(want, axis=-1).astype(jnp.int32)
    for _ in range(3):  # the same continuation from either cache
        want, want_cache = step(params, token, want_cache)
        got, cache = step(params, token, cache)
        np.testing.assert_allclose(got, want, atol=1e-5)
        token = jnp.argmax(want, axis=-1).astype(jnp.int32)


def test_packed_prefill_refuses_a_ring_buffer(tiny):
    _, config, params = tiny  # sliding window 6
    tokens = np.ones((4, 4), np.int32)
    with pytest.raises(ValueError, match="packed prompts need a slot per token; max_len=8"):
        prefill(params, tokens, tokens, config=config, max_len=8, pack_GW=np.zeros((1, 8), int))


def test_packed_sampling_equals_padded_sampling():
    config = dataclasses.replace(TINY_CONFIG, vocab_size=96, sliding_window=None)
    params = _params96()
    rng = np.random.RandomState(5)
    prompts = [list(rng.randint(4, 96, size=n)) for n in rng.randint(1, 17, size=16)]
    opts = SamplingOptions(max_new_tokens=6, eos_ids=(3,), pad_id=0, num_samples=2, top_p=0.9)
    common = dict(config=config, opts=opts, seed=1, iteration=0, batch_size=16, max_prompt_len=16)
    padded = sample_prompts(params, prompts, list(range(16)), pack=False, **common)
    packed = sample_prompts(params, prompts, list(range(16)), **common)
    assert padded.shapes == {(16, 16, 0)} and packed.shapes == {(16, 16, 6)}
    np.testing.assert_array_equal(packed.tokens, padded.tokens)
    np.testing.assert_allclose(packed.logps, padded.logps, atol=1e-5)

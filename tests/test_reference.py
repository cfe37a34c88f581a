"""The reference pass (`ReferenceLogps`): chunked, summed or averaged, from host or device
parameters, packed or not, its logps equal a direct full-sequence computation in NumPy."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from models import forward, init_params
from optune_jax import pair_rows, sharding
from optune_jax.reference import ReferenceLogps
from optune_jax.train_step import PolicySpec
from tests.test_train_step import CONFIG as TINY

CONFIG = dataclasses.replace(TINY, vocab_size=64)  # test_train_step's model, more tokens
PROMPT, WIDTH = 6, 8  # rows of T = 14 tokens
N, S = 5, 3  # 15 responses: a multiple of neither 4 nor 8 rows, nor of 2 prompts a chunk


@functools.cache
def _layout():
    return sharding.Layout(sharding.make_mesh((1, -1, 1)))  # fsdp over the 8 CPU devices


@functools.cache
def _host_params():
    """NumPy weights of the model's shapes, wider than `init_params`' (no compile for them):
    logits spread (std ~4.5) and depend on the context, so swapped, shifted or mis-averaged
    rows give visibly different logps."""
    rng = np.random.default_rng(0)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if "scale" in name:  # the RMS norms
            return np.ones(x.shape, np.float32)
        std = 0.8 if "lm_head" in name else 0.2
        return (std * rng.standard_normal(x.shape)).astype(np.float32)

    shapes = jax.eval_shape(lambda: init_params(CONFIG, jax.random.key(0)))
    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def _device_params():
    return jax.device_put(_host_params(), sharding.param_shardings(CONFIG, _layout()))


@functools.cache
def _reference(average: bool, rows: int, pack: bool = False) -> ReferenceLogps:
    """One instance per setting: the tests share its compiled programs."""
    layout = _layout()
    return ReferenceLogps(
        PolicySpec(CONFIG, average_logps=average), prompt_len=PROMPT, layout=layout,
        param_shardings=sharding.param_shardings(CONFIG, layout), rows=rows, pack=pack,
    )


def _rows(n=N, s=S, seed=0):
    """(tokens, attn, resp) [n, s, T] from `pair_rows.layout`: prompts of 1-6 tokens, responses
    of 1-8 tokens, one of them empty."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 64, rng.integers(1, PROMPT + 1)).tolist() for _ in range(n)]
    tokens = rng.integers(3, 64, (n, s, WIDTH)).astype(np.int32)
    lengths = rng.integers(1, WIDTH + 1, (n, s))
    lengths[1, s - 1] = 0
    return pair_rows.layout(prompts, tokens, lengths, prompt_len=PROMPT, pad_id=0)


_forward = jax.jit(functools.partial(forward, config=CONFIG))


def _direct(tokens_NST, attn_NST, resp_NST):
    """(sums, token counts) [N, S] by hand: one forward over each whole row, a float64
    log-softmax, each response token's log-probability from the logits one column before."""
    n, s, t = tokens_NST.shape
    tok, attn, resp = (x.reshape(n * s, t) for x in (tokens_NST, attn_NST, resp_NST))
    logits = np.asarray(_forward(_host_params(), tok, attn), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    sums = np.zeros(n * s)
    for r in range(n * s):
        for k in range(1, t):
            if resp[r, k]:
                sums[r] += logp[r, k - 1, tok[r, k]]
    return sums.reshape(n, s), resp.sum(-1).reshape(n, s)


@pytest.mark.parametrize("rows", [4, 8])
def test_chunks_with_filler_rows_equal_a_direct_computation_row_for_row(rows):
    """Chunks with filler rows give each response's directly computed logp in its [N, S] place."""
    # 15 rows in chunks of 4 or 8, the last one filled up; an empty response has 0
    assert (N * S) % rows
    rows_NST = _rows()
    want, counts = _direct(*rows_NST)
    got = _reference(False, rows)(_device_params(), *rows_NST)
    assert got.shape == (N, S) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert got[1, S - 1] == 0 and counts[1, S - 1] == 0
    assert len(np.unique(np.round(want, 2))) == N * S  # distinct rows: a swap would show


def test_summed_gives_sums_even_when_the_loss_averages():
    """With `average_logps`, the default gives per-token means and `summed=True` the sums."""
    rows_NST = _rows(seed=1)
    sums, counts = _direct(*rows_NST)
    ref = _reference(True, 8)
    means = ref(_device_params(), *rows_NST)
    summed = ref(_device_params(), *rows_NST, summed=True)
    np.testing.assert_allclose(summed, sums, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(means, sums / np.maximum(counts, 1), rtol=1e-5, atol=1e-5)
    assert means[1, S - 1] == 0 and summed[1, S - 1] == 0
    assert (counts > 1).any() and not np.allclose(means, summed)  # the two really differ


def test_params_waiting_on_the_host_give_the_device_params_result():
    """π_0's weights as NumPy arrays on the host give the logps of the same weights on device."""
    host = _host_params()
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
    rows_NST = _rows(seed=2)
    ref = _reference(False, 8)
    from_host = ref(host, *rows_NST)
    from_device = ref(_device_params(), *rows_NST)
    np.testing.assert_array_equal(from_host, from_device)
    np.testing.assert_allclose(from_host, _direct(*rows_NST)[0], rtol=1e-5, atol=1e-4)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))  # left on the host


def test_packed_three_samples_per_prompt_equal_padded_rows():
    """Packed, S = 3 and a half-filler last chunk: the padded pass's (and direct) means and sums."""
    # 2 prompts a chunk of 8 rows, 5 prompts, lines split over the 8 devices
    rows_NST = _rows(seed=3)
    sums, counts = _direct(*rows_NST)
    padded, packed = _reference(True, 8), _reference(True, 8, pack=True)
    params = _device_params()
    for summed, want in ((False, sums / np.maximum(counts, 1)), (True, sums)):
        got = packed(params, *rows_NST, summed=summed)
        assert got.shape == (N, S)
        np.testing.assert_allclose(got, padded(params, *rows_NST, summed=summed), atol=2e-5,
                                   rtol=1e-5)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert packed.compiled[S]  # the line shapes for S = 3 were chosen and kept

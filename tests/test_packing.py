"""Packing (train.pack): the lines hold every response once after its prompt, and the packed
logps, losses and gradients equal those of the padded rows."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from losses import LOSSES, packed_sequence_logps, sequence_logps
from models import init_params
from models.lora import LoraSpec, init_lora
from optune_jax.batch import OnlineSamples
from optune_jax.optimizer import make_optimizer
from optune_jax.packing import LINE_BUCKETS, choose_line, count_lines, pack_batch, pack_rows
from optune_jax.train_step import (
    LossChoice,
    PolicySpec,
    TrainState,
    _trainable_loss,
    branch_logps,
    train_step,
)

from .test_train_step import CONFIG, PROMPT, as_batch
from .test_train_step import pairs as _pairs


def pairs(**kw):
    """test_train_step's pairs, chosen and rejected after the same prompt as in D_t."""
    batch = _pairs(**kw)
    batch.tokens[:, 1, :PROMPT] = batch.tokens[:, 0, :PROMPT]
    return batch


def _responses(rows_NST, resp_NST):
    return [[r[m == 1].tolist() for r, m in zip(row, mask, strict=True)]
            for row, mask in zip(rows_NST[:, :, PROMPT:], resp_NST[:, :, PROMPT:], strict=True)]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_lines_hold_each_prompt_once_and_every_response_token(k, s, seed, shards):
    """A brute-force reading of the lines: each target's slot is the token before it in its
    own response (its prompt's last token for the first), at the position the padded row
    gives it, in the same segment; prompts appear once, padding is marked."""
    rng = np.random.default_rng(seed)
    batch = pairs(k=k, seed=seed % 1000)
    tokens = np.repeat(batch.tokens[:, :1], s, 1)
    attn, resp = (np.repeat(x[:, :1], s, 1) for x in (batch.attn, batch.resp))
    for n in range(k):  # responses of their own lengths, the prompt shared
        for b in range(1, s):
            y = rng.integers(0, tokens.shape[-1] - PROMPT + 1)
            tokens[n, b, PROMPT:] = rng.integers(1, 32, tokens.shape[-1] - PROMPT)
            resp[n, b, PROMPT:] = np.arange(tokens.shape[-1] - PROMPT) < y
            attn[n, b, PROMPT:] = resp[n, b, PROMPT:]
    keep = rng.random((k, s)) < 0.8
    p = pack_rows(tokens, attn, resp, prompt_len=PROMPT, keep_NS=keep, shards=shards,
                  key_cost=rng.choice([0.0, 0.01]))
    w, line = p.tokens.shape
    assert w % shards == 0 and line in LINE_BUCKETS and len(p.target) % shards == 0
    flat = {f: getattr(p, f).reshape(-1) for f in ("tokens", "pos", "segment", "branch")}
    want = _responses(tokens, resp)
    got = [[[] for _ in range(s)] for _ in range(k)]
    for at, target, seq in zip(p.logit_at, p.target, p.seq, strict=True):
        if seq < 0:
            continue
        n, b = divmod(int(seq), s)
        i = len(got[n][b])
        prompt = tokens[n, b, :PROMPT][attn[n, b, :PROMPT] == 1]
        before = prompt[-1] if i == 0 else want[n][b][i - 1]
        assert flat["tokens"][at] == before and flat["segment"][at] == n
        assert flat["pos"][at] == len(prompt) - 1 + i
        assert flat["branch"][at] == (0 if i == 0 else b + 1)
        got[n][b].append(int(target))
    for n in range(k):
        for b in range(s):
            assert got[n][b] == (want[n][b] if keep[n, b] else [])
    kept_prompts = sum(int(attn[n, 0, :PROMPT].sum()) for n in range(k) if keep[n].any())
    assert int(((flat["segment"] >= 0) & (flat["branch"] == 0)).sum()) == kept_prompts
    assert (flat["branch"][flat["segment"] < 0] == 0).all()


def test_first_fit_uses_the_fewest_lines_for_simple_sizes():
    assert count_lines([], 16) == 1
    assert count_lines([10, 6, 10, 6], 16) == 2
    assert count_lines([10, 6, 10, 6], 16, shards=4) == 4
    with pytest.raises(ValueError, match="exceeds the line of 16"):
        count_lines([17], 16)


def test_the_line_length_weighs_padding_against_attention():
    """Free attention: the fewest slots; costly attention: shorter lines."""
    sizes = [[100, 100, 100, 100]]
    assert choose_line(sizes, shards=1, key_cost=0.0) == (1, 416)  # 400 of 416 slots used
    assert choose_line(sizes, shards=1, key_cost=0.01) == (4, 128)
    assert choose_line(sizes, shards=4, key_cost=0.0) == (4, 128)  # 1 line of 416 -> 4
    assert choose_line([[100, 100, 100, 100], [40]], shards=1, key_cost=1e-3) == (2, 224)
    assert choose_line([[9000]], shards=1, key_cost=0.0) == (1, 9008)  # beyond the buckets


def test_a_compiled_shape_is_reused_unless_it_costs_too_much_more():
    sizes, compiled = [[100, 100, 100, 100]], {(2, 224), (1, 128)}  # (1, 128) cannot hold them
    assert choose_line(sizes, shards=1, key_cost=0.0, compiled=compiled) == (2, 224)  # 448 slots
    assert compiled == {(2, 224), (1, 128)}
    compiled = {(4, 256)}  # 1024 slots, more than 1.3 x 416
    assert choose_line(sizes, shards=1, key_cost=0.0, compiled=compiled) == (1, 416)
    assert compiled == {(4, 256), (1, 416)}


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(1, 3), (6, 5)]), st.booleans(), st.integers(0, 2**31 - 1))
def test_packed_sequence_logps_equal_sequence_logps(shape, average, seed):
    """Two shapes (each compiled once); the masks, the order and the values vary."""
    (b, t), rng = shape, np.random.default_rng(seed)
    logits = rng.normal(size=(b, t, 7)).astype(np.float32) * 3
    labels = rng.integers(0, 7, (b, t))
    mask = rng.random((b, t)) < 0.6
    want = sequence_logps(logits, labels, mask, average=average)
    order = rng.permutation(b * t)  # any order, with filler in between
    seq = np.where(mask, np.arange(b)[:, None], -1).reshape(-1)[order]
    got = packed_sequence_logps(
        logits.reshape(b * t, 7)[order], labels.reshape(-1)[order], seq, b, average=average
    )
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


WINDOWED = dataclasses.replace(CONFIG, sliding_window=4)


def _with_samples(batch, s=3, seed=1):
    """HyPO's S samples of each pair's prompt, of their own lengths (one prompt without)."""
    rng = np.random.default_rng(seed)
    k, _, t = batch.tokens.shape
    tokens = np.repeat(batch.tokens[:, :1], s, 1).copy()
    attn = np.repeat(batch.attn[:, :1], s, 1).copy()
    resp = np.zeros_like(attn)
    for n in range(k):
        for b in range(s):
            y = rng.integers(1, t - PROMPT + 1)
            tokens[n, b, PROMPT:] = rng.integers(1, 32, t - PROMPT)
            resp[n, b, PROMPT:] = np.arange(t - PROMPT) < y
            attn[n, b, PROMPT:] = resp[n, b, PROMPT:]
    mask = np.arange(k) != 1
    ref = rng.normal(size=(k, s)).astype(np.float32) - 5
    return batch.replace(samples=OnlineSamples(tokens, attn, resp, ref, mask))


@pytest.mark.parametrize("config", [CONFIG, WINDOWED], ids=["full", "window4"])
@pytest.mark.parametrize("average", [False, True])
def test_packed_logps_equal_padded(config, average):
    params = init_params(config, jax.random.key(0))
    micro = _with_samples(pairs(k=4, resp=7))
    spec = PolicySpec(config, average_logps=average)
    logps = jax.jit(lambda b: branch_logps(params, b, policy=spec, prompt_len=PROMPT))
    want = logps(micro)
    packed = jax.tree.map(lambda x: x[0], pack_batch(as_batch(micro, 1), prompt_len=PROMPT))
    assert packed.tokens is None and packed.samples.tokens is None
    got = logps(packed)
    assert got.shape == want.shape == (4, 5)
    keep = np.concatenate(
        [np.ones((4, 2), bool), np.repeat(micro.samples.mask[:, None], 3, 1)], axis=1
    )
    np.testing.assert_allclose(np.where(keep, got, 0), np.where(keep, want, 0), atol=1e-5)
    assert (np.asarray(got)[~keep] == 0).all()  # left out: the loss never counts them


def _rel(a, b):
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a),
                                                          jax.tree.leaves(b), strict=True))
    den = sum(float(jnp.sum(y**2)) for y in jax.tree.leaves(b))
    return (num / max(den, 1e-30)) ** 0.5


# every loss with full fine-tuning; LoRA's path (the merge before the forward) is the same for
# every loss, so it runs with HyPO's, the one that also carries online samples
@pytest.mark.parametrize(
    "name, lora", [(name, False) for name in sorted(LOSSES)] + [("hypo", True)],
    ids=[f"full-{name}" for name in sorted(LOSSES)] + ["lora-hypo"],
)
def test_every_loss_and_its_gradient_equal_padded(name, lora):
    params = init_params(CONFIG, jax.random.key(0))
    batch = pairs(k=4, resp=7)
    batch = batch.replace(pair_mask=np.array([True, True, False, True]))
    if LOSSES[name].needs_samples:
        batch = _with_samples(batch)
    values = {"beta": 0.1, "beta2": 5.0, "lam": 0.5, "rpo_alpha": 0.5}
    kw = dict(policy=PolicySpec(CONFIG), loss=LossChoice.from_values(name, values),
              prompt_len=PROMPT)
    spec, trainable, frozen = None, params, None
    if lora:
        spec = LoraSpec(rank=2, num_adapters=2)
        frozen, trainable = params, init_lora(params, spec, jax.random.key(1))
        noise = lambda x, k: x + 0.05 * jax.random.normal(k, x.shape)  # B = 0 hides the path
        keys = jax.random.split(jax.random.key(2), len(jax.tree.leaves(trainable)))
        trainable = jax.tree.unflatten(
            jax.tree.structure(trainable), list(map(noise, jax.tree.leaves(trainable), keys))
        )
    packed = jax.tree.map(lambda x: x[0], pack_batch(as_batch(batch, 1), prompt_len=PROMPT))

    @jax.jit
    def value_and_grad(micro):
        fn = lambda p: _trainable_loss(p, micro, frozen, lora=spec, **kw)
        return jax.value_and_grad(fn, has_aux=True)(trainable)

    (want, want_m), want_g = value_and_grad(batch)
    (got, got_m), got_g = value_and_grad(packed)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for key in want_m:
        np.testing.assert_allclose(got_m[key], want_m[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert _rel(got_g, want_g) < 1e-5


def test_line_counts_compile_once_each():
    """Batches of any lengths: one compiled step per (lines, length) bucket."""
    params = init_params(CONFIG, jax.random.key(0))
    opt = make_optimizer(name="adamw", learning_rate=1e-3, total_steps=10, warmup_ratio=0.0,
                         weight_decay=0.0, max_grad_norm=1.0)
    state = TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))
    step = jax.jit(lambda st, b: train_step(st, b, optimizer=opt, policy=PolicySpec(CONFIG),
                                            loss=LossChoice.from_values("dpo", {"beta": 0.1}),
                                            prompt_len=PROMPT))
    shapes = set()
    for seed in range(12):
        batch = pack_batch(as_batch(pairs(k=4, resp=7, seed=seed), 2), prompt_len=PROMPT)
        shapes.add(batch.packed.tokens.shape)
        state, _ = step(state, batch)
    # segments of 2-17 slots: lines of 32 or 64 (the buckets), one or two lines
    assert step._cache_size() == len(shapes) <= 4


@pytest.mark.parametrize("s", [1, 2, 3])
def test_the_reference_pass_packed_equals_padded(s):
    """ReferenceLogps over rows [N, S, T] in chunks (the last one short), packed or not."""
    from optune_jax import sharding
    from optune_jax.reference import ReferenceLogps

    layout = sharding.Layout(sharding.make_mesh((1, 1, 1)), sharding.make_rules())
    params = init_params(CONFIG, jax.random.key(0))
    kw = dict(prompt_len=PROMPT, layout=layout, rows=4,
              param_shardings=sharding.param_shardings(CONFIG, layout))
    batch = _with_samples(pairs(k=5, resp=7), s=s)
    rows = (batch.samples.tokens, batch.samples.attn, batch.samples.resp)
    for summed in (False, True):
        spec = PolicySpec(CONFIG, average_logps=True)
        want = ReferenceLogps(spec, **kw)(params, *rows, summed=summed)
        got = ReferenceLogps(spec, pack=True, **kw)(params, *rows, summed=summed)
        assert got.shape == want.shape == (5, s)
        np.testing.assert_allclose(got, want, atol=1e-5)

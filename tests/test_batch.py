"""Typed batches: host slicing into optimizer steps, and the abstract batch the dry run lowers."""

import jax
import numpy as np
import pytest

from optune_jax.batch import OnlineSamples, PairBatch, micro_batches


def host_pairs(q: int, t: int = 5) -> PairBatch:
    """Q pairs whose every entry names its pair (pair i holds the value i)."""
    i = np.arange(q)
    rows = lambda dtype: np.broadcast_to(i[:, None, None], (q, 2, t)).astype(dtype)
    return PairBatch(
        tokens=rows(np.int32),
        attn=rows(np.int32),
        resp=rows(np.int32),
        ref_logps=np.stack([i, -i], 1).astype(np.float32),
        rewards=np.stack([i, i], 1).astype(np.float32),
        pair_mask=np.ones((q,), bool),
    )


@pytest.mark.parametrize("q", [8, 11, 1])
def test_micro_batches_follow_the_order_and_fill_the_last_with_masked_copies(q):
    order = np.random.default_rng(q).permutation(q)
    got = list(micro_batches(host_pairs(q), order, batch_size=4, micro_batch_size=2))
    assert len(got) == -(-q // 4)
    for n, (idx, batch) in enumerate(got):
        part = order[4 * n : 4 * n + 4]
        fill = 4 - len(part)
        np.testing.assert_array_equal(idx, np.concatenate([part, np.repeat(part[:1], fill)]))
        for leaf in jax.tree.leaves(batch):
            assert leaf.shape[:2] == (2, 2)
        # each slot holds the pair it names; the fill repeats the batch's first pair, masked
        np.testing.assert_array_equal(batch.tokens[..., 0, 0].reshape(-1), idx)
        np.testing.assert_array_equal(batch.ref_logps.reshape(-1, 2)[:, 1], -idx)
        np.testing.assert_array_equal(batch.pair_mask.reshape(-1), np.arange(4) < len(part))
    assert host_pairs(q).pair_mask.all()  # the host batch itself is never changed


@pytest.mark.parametrize("samples", [0, 3])
def test_the_abstract_batch_is_the_step_batch(samples):
    a, m, t = 2, 3, 7
    batch = host_pairs(a * m, t)
    if samples:
        s = samples
        rows = np.zeros((a * m, s, t), np.int32)
        batch = batch.replace(
            samples=OnlineSamples(rows, rows, rows, np.zeros((a * m, s), np.float32),
                                  np.zeros((a * m,), bool))
        )
    _, step = next(micro_batches(batch, np.arange(a * m), batch_size=a * m, micro_batch_size=m))
    abstract = PairBatch.abstract((a, m), t, samples=samples)
    assert jax.tree.structure(abstract) == jax.tree.structure(step)
    for want, got in zip(jax.tree.leaves(abstract), jax.tree.leaves(step), strict=True):
        assert (want.shape, want.dtype) == (got.shape, got.dtype)

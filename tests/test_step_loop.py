"""The step loop on a fake step: weighted metric sums, skipped steps, the guard, hook order."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optune_jax.run.errors import RunError
from optune_jax.run.step_loop import StepSums, run_steps

try:
    from optune_jax.run.guard import NonFiniteGuard
except ImportError:
    from optune_jax.train_step import NonFiniteGuard

FROZEN = np.float32(0.5)  # the step's third argument: scales each update


@jax.jit
def fake_step(state, batch, frozen):
    """state + frozen · Σv, or the state as it was when the batch says skip (loss NaN then)."""
    v, skip = batch["v"], batch["skip"]
    metrics = {
        "loss": jnp.where(skip, jnp.nan, jnp.sum(v)),
        "accuracy": jnp.mean((v > 0).astype(jnp.float32)),
        "kl": jnp.max(v),
        "grad_norm": jnp.sum(jnp.abs(v)),
        "num_pairs": batch["pairs"],
        "num_prompts": batch["prompts"],
        "skipped": skip.astype(jnp.float32),
    }
    return jnp.where(skip, state, state + frozen * jnp.sum(v)), metrics


def _batches(skips, seed=0):
    """(indices, host batch) items: 4 random values, 1-8 pairs and 1-4 prompts each."""
    rng = np.random.default_rng(seed)
    return [
        (np.arange(2) + 2 * n, {
            "v": rng.normal(size=4).astype(np.float32),
            "pairs": np.int32(rng.integers(1, 9)),
            "prompts": np.int32(rng.integers(1, 5)),
            "skip": np.bool_(skip),
        })
        for n, skip in enumerate(skips)
    ]


def _run(batches, guard, **kw):
    kw = dict(frozen=FROZEN, sharding=None, guard=guard, where="iteration 3",
              total=len(batches), desc="test", progress=False) | kw
    return run_steps(fake_step, jnp.float32(0.0), iter(batches), **kw)


class RecordingGuard:
    """Counts a step when it was not skipped, writing down each `where` it is given."""

    def __init__(self, events):
        self.events = events

    def counts(self, metrics, *, where):
        self.events.append(("fetch", where))
        return not metrics["skipped"]


def test_means_weight_by_pairs_and_kl_by_prompts_over_the_counted_steps_only():
    """Means match a NumPy brute force: pair metrics weighted by num_pairs, kl by num_prompts,
    grad_norm a plain mean, all over counted steps; skipped steps counted apart."""
    skips = [False, True, False, False, True, False, False]
    batches = _batches(skips)
    state, sums, _ = _run(batches, NonFiniteGuard(3))
    kept = [b for _, b in batches if not b["skip"]]
    v = np.stack([b["v"] for b in kept]).astype(np.float64)
    pairs = np.asarray([b["pairs"] for b in kept], np.float64)
    prompts = np.asarray([b["prompts"] for b in kept], np.float64)
    expected = {
        "loss": np.sum(pairs * v.sum(1)) / pairs.sum(),
        "accuracy": np.sum(pairs * (v > 0).mean(1)) / pairs.sum(),
        "kl": np.sum(prompts * v.max(1)) / prompts.sum(),
        "steps": 7,
        "skipped_steps": 2,
        "pairs_trained": pairs.sum(),
        "grad_norm": np.abs(v).sum(1).mean(),
    }
    got = sums.means()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    assert float(state) == pytest.approx(0.5 * v.sum(), rel=1e-6)  # skipped steps changed nothing


def test_step_sums_by_hand():
    """StepSums: (3·1 + 1·2)/4 pair mean, (2·0.5 + 6·1)/8 KL mean, `keep` picks and orders the
    means, grad_norm over counted steps, NaN when none counted."""
    sums = StepSums()
    sums.add({"loss": 1.0, "margin": 4.0, "kl": 0.5, "num_pairs": 3, "num_prompts": 2,
              "grad_norm": 2.0})
    sums.add({"loss": 2.0, "margin": 0.0, "kl": 1.0, "num_pairs": 1, "num_prompts": 6,
              "grad_norm": 4.0})
    sums.steps, sums.skipped = 3, 1
    assert sums.means() == {"loss": 1.25, "margin": 3.0, "kl": 0.875, "steps": 3,
                            "skipped_steps": 1, "pairs_trained": 4.0, "grad_norm": 3.0}
    kept = sums.means(keep=("margin", "accuracy", "loss"))
    assert list(kept) == ["margin", "loss", "steps", "skipped_steps", "pairs_trained", "grad_norm"]
    none = StepSums(steps=2, skipped=2).means()
    assert math.isnan(none["grad_norm"]) and none["pairs_trained"] == 0.0
    assert (none["steps"], none["skipped_steps"]) == (2, 2)


def test_every_step_skipped_or_none_given_leaves_nan_grad_norm():
    """All steps skipped (below the guard's limit): the state as it was, NaN grad_norm; no
    batches at all: no steps and no first metrics."""
    state, sums, first = _run(_batches([True, True]), NonFiniteGuard(3))
    out = sums.means()
    assert float(state) == 0.0 and (out["steps"], out["skipped_steps"]) == (2, 2)
    assert math.isnan(out["grad_norm"]) and out["pairs_trained"] == 0.0
    assert first["skipped"] == 1.0
    state, sums, first = _run([], NonFiniteGuard(3))
    assert float(state) == 0.0 and first == {} and sums.steps == 0
    assert math.isnan(sums.means()["grad_norm"])


def test_the_limit_th_skipped_step_in_a_row_stops_naming_step_n_of_total():
    """The guard raises on the limit-th skipped step in a row, as "where, step n of total"
    (steps from 1); a streak the guard carries in from before counts."""
    batches = _batches([False, True, False, True, True, False])
    with pytest.raises(RunError) as info:
        _run(batches, NonFiniteGuard(2), total=9)
    assert str(info.value).startswith(
        "iteration 3, step 5 of 9: 2 optimizer steps in a row were skipped, the last for a "
        "non-finite loss (nan) (train.max_skipped_steps=2)"
    )
    carried = NonFiniteGuard(2, in_a_row=1)
    with pytest.raises(RunError, match=r"^epoch 1, step 1 of 2: 2 optimizer steps in a row"):
        _run(_batches([True, False]), carried, where="epoch 1")
    fresh = NonFiniteGuard(2)
    _, sums, _ = _run(_batches([True, False, True, False]), fresh)
    assert sums.skipped == 2 and fresh.in_a_row == 0


def test_before_step_gets_each_index_and_the_state_before_step_n_and_its_batch_is_stepped():
    """before_step(idx, batch, state, n): n from 0, the state after n steps; the batch it returns
    is the one the step runs on."""
    batches = _batches([False, False, True, False])
    calls = []

    def doubled(idx, batch, state, n):
        calls.append((idx.tolist(), n, float(state)))
        return {**batch, "v": 2 * batch["v"]}

    state, _, _ = _run(batches, NonFiniteGuard(3), before_step=doubled)
    sums_v = [0.0 if b["skip"] else 2 * 0.5 * float(np.sum(b["v"])) for _, b in batches]
    before = np.concatenate([[0.0], np.cumsum(sums_v)])
    assert [c[:2] for c in calls] == [([0, 1], 0), ([2, 3], 1), ([4, 5], 2), ([6, 7], 3)]
    np.testing.assert_allclose([c[2] for c in calls], before[:4], rtol=1e-6, atol=1e-6)
    assert float(state) == pytest.approx(before[4], rel=1e-6, abs=1e-6)


def test_step_n_metrics_are_fetched_once_each_after_step_n_plus_1_is_dispatched():
    """The host fetches step n's metrics only after the hook for step n+1 ran, the last one
    after the loop, each step once, named "where, step n of total"."""
    events = []

    def hook(idx, batch, state, n):
        events.append(("before", n))
        return batch

    _run(_batches([False] * 3), RecordingGuard(events), where="epoch 0", before_step=hook)
    assert events == [
        ("before", 0), ("before", 1), ("fetch", "epoch 0, step 1 of 3"),
        ("before", 2), ("fetch", "epoch 0, step 2 of 3"), ("fetch", "epoch 0, step 3 of 3"),
    ]


def test_the_first_steps_metrics_come_back_on_the_host():
    """The third result is step 0's metrics as host values, whatever the later steps gave."""
    batches = _batches([False, True, False], seed=1)
    _, _, first = _run(batches, NonFiniteGuard(3))
    b = batches[0][1]
    assert all(isinstance(v, np.ndarray | np.generic) for v in first.values())
    assert float(first["loss"]) == pytest.approx(float(np.sum(b["v"])), rel=1e-6)
    assert float(first["kl"]) == float(np.max(b["v"]))
    assert (int(first["num_pairs"]), float(first["skipped"])) == (int(b["pairs"]), 0.0)

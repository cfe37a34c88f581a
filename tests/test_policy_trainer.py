"""The training phase (`PolicyTrainer`) on a fake step that records what it was given: the
seeded epoch order, the batches and micro-batches, the optimizer's restart or carry-over, the
before-step hook, packing and the metrics, each against a brute-force NumPy expectation."""

import dataclasses
import functools
import math

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from models import ModelConfig
from optune_jax import pair_rows, sharding
from optune_jax.batch import PairBatch
from optune_jax.optimizer import build_optimizer, create_state
from optune_jax.policy_trainer import PolicyTrainer
from optune_jax.run.config_file import load_config
from optune_jax.run.guard import NonFiniteGuard

PROMPT, WIDTH = 4, 3  # rows of T = 7 tokens
SEED = 11
MODEL = ModelConfig(  # only the packing's key cost reads it
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
)


@functools.cache
def _tiny_train():
    return load_config("configs/tiny.yaml").train


def _train_section(**kw):
    """tiny.yaml's train section: 2 epochs of 16-pair steps in micro-batches of 8, unpacked."""
    base = dict(epochs=2, batch_size=16, micro_batch_size=8, pack=False, warmup_ratio=0.3,
                schedule="per_iteration", optimizer="adamw", learning_rate=1e-2)
    return dataclasses.replace(_tiny_train(), **(base | kw))


@functools.cache
def _layout():
    return sharding.Layout(sharding.make_mesh((1, -1, 1)))  # 8 CPU devices on `fsdp`


def _pairs(q, *, masked=(), seed=0):
    """A host PairBatch [Q] whose pair i carries i in its chosen reward, -1 - i in its
    rejected one and i + 1 as every token of its chosen response (prompts of 1-4 tokens,
    responses of 1-3); the pairs in `masked` are masked out (ties)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 64, rng.integers(1, PROMPT + 1)).tolist() for _ in range(q)]
    tokens = np.stack([np.repeat(np.arange(1, q + 1)[:, None], WIDTH, 1),
                       rng.integers(1, 64, (q, WIDTH))], axis=1).astype(np.int32)
    lengths = rng.integers(1, WIDTH + 1, (q, 2))
    rows = pair_rows.layout(prompts, tokens, lengths, prompt_len=PROMPT, pad_id=0)
    ids = np.arange(q, dtype=np.float32)
    mask = np.ones(q, bool)
    mask[list(masked)] = False
    return PairBatch(*rows, ref_logps=np.zeros((q, 2), np.float32),
                     rewards=np.stack([ids, -1 - ids], axis=1), pair_mask=mask)


def _expected_steps(q, cfg, t, mask_Q):
    """Brute force: [(pair ids, their mask)] of each step, batch_size pairs each (the last
    filled with masked pairs), epoch by epoch in the order the seed, t and epoch give."""
    out = []
    for epoch in range(cfg.epochs):
        order = np.random.default_rng([SEED, t, epoch, 7]).permutation(q)
        for start in range(0, q, cfg.batch_size):
            ids = order[start : start + cfg.batch_size]
            out.append((ids, mask_Q[ids]))
    return out


def _apply_update(transform, state):
    """One real optimizer update with gradients of ones: moments and schedule move on."""
    grads = jax.tree.map(lambda x: x * 0 + 1, state.params)
    updates, opt_state = transform.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)


class FakeStep:
    """`step(state, batch, frozen)`: writes down what it was given (the batch on the host, the
    schedule and moments of the state), applies one optimizer update unless its index is in
    `skip` (reported non-finite, like `accumulated_step`), and returns metrics like the real
    step: loss = the mean id of the counted pairs."""

    def __init__(self, plan, skip=()):
        self.seen, self.skip = [], set(skip)
        self._update = jax.jit(functools.partial(_apply_update, plan.transform))

    def __call__(self, state, batch, frozen):
        n, host = len(self.seen), jax.device_get(batch)
        schedule = optax.tree_utils.tree_get(state.opt_state, "ScheduleState")
        nu = optax.tree_utils.tree_get(state.opt_state, "nu")
        self.seen.append(dict(
            batch=host, frozen=frozen, sharding=batch.pair_mask.sharding,
            schedule=tuple(int(x) for x in schedule), step=int(state.step),
            nu=sum(float(np.abs(x).sum()) for x in jax.tree.leaves(nu)),
            w=np.array(state.params["w"]),
        ))
        mask = host.pair_mask.reshape(-1)
        ids = host.rewards[..., 0].reshape(-1)[mask]
        skipped = n in self.skip
        if not skipped:
            state = self._update(state)
        metrics = dict(num_pairs=np.float32(mask.sum()),
                       loss=np.float32(ids.mean() if len(ids) else 0.0),
                       grad_norm=np.float32(n + 1), skipped=np.float32(skipped))
        return state, metrics


def _setup(cfg, *, updates_per_iteration=10, iterations=1, skip=()):
    """(trainer, fake step, initial state) on 8 devices, `w` sharded over them."""
    layout = _layout()
    mesh = layout.mesh
    shard = lambda *spec: NamedSharding(mesh, PartitionSpec(*spec))
    params = {"w": jax.device_put(np.ones((8, 4), np.float32), shard("fsdp")),
              "b": jax.device_put(np.zeros((4,), np.float32), shard())}
    plan = build_optimizer(cfg, updates_per_iteration=updates_per_iteration,
                           iterations=iterations)
    state, shardings = create_state(params, plan.transform, mesh)
    step = FakeStep(plan, skip)
    trainer = PolicyTrainer(
        cfg, seed=SEED, step=step,
        batch_sharding=sharding.batch_sharding(layout, cfg.micro_batch_size, axis=1),
        plan=plan, state_shardings=shardings, prompt_len=PROMPT, model=MODEL, progress=False,
    )
    return trainer, step, state


@pytest.mark.parametrize("q, epochs", [(21, 2), (16, 1), (5, 3)])
def test_each_epoch_visits_every_pair_once_in_the_seeded_order(q, epochs):
    """epochs × ceil(Q / B) steps over each epoch's seeded permutation; metrics as brute force."""
    # each step's batch [2, 8] holds the next 16 pairs, rows and rewards together, the last
    # filled up with masked pairs; masked pairs stay masked; one step reported non-finite
    cfg, t = _train_section(epochs=epochs), 3
    trainer, step, state = _setup(cfg, skip={2} if epochs * math.ceil(q / 16) > 2 else ())
    batch = _pairs(q, masked=[4])
    frozen = object()
    _, metrics = trainer.train(state, batch, t, guard=NonFiniteGuard(3), frozen=frozen)

    want = _expected_steps(q, cfg, t, batch.pair_mask)
    assert len(step.seen) == len(want) == epochs * math.ceil(q / cfg.batch_size)
    batch_sharding = sharding.batch_sharding(_layout(), 8, axis=1)
    losses, counts = [], []
    for seen, (ids, mask) in zip(step.seen, want, strict=True):
        got, k = seen["batch"], len(ids)
        assert got.rewards.shape == (2, 8, 2) and got.tokens.shape == (2, 8, 2, PROMPT + WIDTH)
        assert seen["frozen"] is frozen and seen["sharding"].is_equivalent_to(batch_sharding, 2)
        flat_ids = got.rewards[..., 0].reshape(-1)
        np.testing.assert_array_equal(flat_ids[:k], ids)
        np.testing.assert_array_equal(got.rewards[..., 1].reshape(-1), -1 - flat_ids)
        chosen_first = got.tokens[:, :, 0, PROMPT].reshape(-1)  # the row follows its pair
        np.testing.assert_array_equal(chosen_first, flat_ids + 1)
        np.testing.assert_array_equal(got.pair_mask.reshape(-1)[:k], mask)
        assert not got.pair_mask.reshape(-1)[k:].any()  # filler
        assert np.isin(flat_ids[k:], ids).all()  # copies of this batch's pairs
        losses.append(ids[mask].mean() if mask.any() else 0.0)
        counts.append(mask.sum())
    for epoch in range(epochs):  # every pair exactly once an epoch
        per = math.ceil(q / cfg.batch_size)
        seen_ids = np.concatenate([ids for ids, _ in want[epoch * per : (epoch + 1) * per]])
        assert sorted(seen_ids) == list(range(q))

    counted = [i for i in range(len(want)) if i not in step.skip]
    pairs = sum(counts[i] for i in counted)
    assert metrics["steps"] == len(want) and metrics["skipped_steps"] == len(step.skip)
    assert metrics["pairs_trained"] == pairs
    np.testing.assert_allclose(metrics["loss"], sum(counts[i] * losses[i] for i in counted)
                               / pairs, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], np.mean([i + 1 for i in counted]))
    np.testing.assert_allclose(metrics["first.loss"], losses[0], rtol=1e-6)


def test_per_iteration_restarts_the_optimizer_before_each_call():
    """`per_iteration`: each call restarts moments and schedule over its own steps, not params."""
    # the schedule over this call's steps (not the planned 10), warm-up ceil(0.3 × steps)
    cfg = _train_section(schedule="per_iteration")
    trainer, step, state = _setup(cfg, updates_per_iteration=10)
    assert tuple(int(x) for x in optax.tree_utils.tree_get(state.opt_state, "ScheduleState")) \
        == (0, 10, 3)
    state, _ = trainer.train(state, _pairs(21), 0, guard=NonFiniteGuard(3))
    after_first = np.array(state.params["w"])
    state, _ = trainer.train(state, _pairs(9, seed=1), 1, guard=NonFiniteGuard(3))
    assert [s["schedule"] for s in step.seen] == (
        [(c, 4, 2) for c in range(4)] + [(c, 2, 1) for c in range(2)]  # 2 × ceil(21/16), ...
    )
    assert [s["nu"] == 0 for s in step.seen] == [True, False, False, False, True, False]
    assert [s["step"] for s in step.seen] == list(range(6))
    np.testing.assert_array_equal(step.seen[4]["w"], after_first)
    assert not np.array_equal(after_first, np.ones((8, 4), np.float32))
    schedule = optax.tree_utils.tree_get(state.opt_state, "ScheduleState")
    assert tuple(int(x) for x in schedule) == (2, 2, 1)


def test_continuous_carries_the_optimizer_state_between_calls():
    """`continuous`: the second call goes on from the first call's schedule count and moments."""
    # one schedule over all iterations' planned steps: 3 × 10, warm-up 9
    cfg = _train_section(schedule="continuous")
    trainer, step, state = _setup(cfg, updates_per_iteration=10, iterations=3)
    state, _ = trainer.train(state, _pairs(21), 0, guard=NonFiniteGuard(3))
    state, _ = trainer.train(state, _pairs(9, seed=1), 1, guard=NonFiniteGuard(3))
    assert [s["schedule"] for s in step.seen] == [(c, 30, 9) for c in range(6)]
    assert [s["nu"] == 0 for s in step.seen] == [True] + [False] * 5
    schedule = optax.tree_utils.tree_get(state.opt_state, "ScheduleState")
    assert tuple(int(x) for x in schedule) == (6, 30, 9)


def test_before_step_is_called_once_a_step_and_its_batch_is_stepped():
    """`before_step` runs once before each step with its index and ids; its batch is stepped."""
    cfg = _train_section(epochs=2)
    trainer, step, state = _setup(cfg)
    calls = []

    def hook(idx, batch, state, n):
        calls.append((n, np.array(idx), int(state.step)))
        np.testing.assert_array_equal(batch.rewards[..., 0].reshape(-1), idx)
        return batch.replace(ref_logps=np.full(batch.ref_logps.shape, 1000.0 + n, np.float32))

    trainer.train(state, _pairs(21), 5, guard=NonFiniteGuard(3), before_step=hook)
    want = _expected_steps(21, cfg, 5, np.ones(21, bool))
    assert [n for n, _, _ in calls] == list(range(len(want))) == list(range(4))
    for (n, idx, at), (ids, _) in zip(calls, want, strict=True):
        np.testing.assert_array_equal(idx[: len(ids)], ids)
        assert at == n  # the state as the previous steps left it
    for n, seen in enumerate(step.seen):
        assert (seen["batch"].ref_logps == 1000.0 + n).all()


def test_pack_gives_the_step_packed_rows_made_after_the_hook():
    """`train.pack`: the step gets the hook's rows packed, counted pairs' responses as targets."""
    # lines split over the 8 devices; masked and filler pairs left out
    cfg = _train_section(epochs=1, pack=True)
    trainer, step, state = _setup(cfg)
    batch = _pairs(21, masked=[4])

    def hook(idx, batch, state, n):
        assert batch.packed is None and batch.tokens is not None
        tokens = batch.tokens.copy()
        tokens[:, :, 0, PROMPT:] = np.where(batch.resp[:, :, 0, PROMPT:] == 1, 50 + n, 0)
        return batch.replace(tokens=tokens)

    trainer.train(state, batch, 2, guard=NonFiniteGuard(3), before_step=hook)
    want = _expected_steps(21, cfg, 2, batch.pair_mask)
    assert len(step.seen) == len(want) == 2
    for n, (seen, (ids, mask)) in enumerate(zip(step.seen, want, strict=True)):
        got = seen["batch"]
        assert got.tokens is None and got.packed is not None
        assert got.packed.tokens.shape[0] == 2  # [A, G, W]
        assert got.packed.tokens.shape[1] % 8 == 0  # G lines split over 8 devices
        kept = np.zeros(16, bool)
        kept[: len(ids)] = mask
        flat_ids = got.rewards[..., 0].reshape(-1).astype(int)
        for a in range(2):
            target, seq = got.packed.target[a], got.packed.seq[a]
            for m in range(8):
                pair = flat_ids[a * 8 + m]
                chosen, rejected = target[seq == 2 * m].tolist(), target[seq == 2 * m + 1].tolist()
                if not kept[a * 8 + m]:
                    assert chosen == rejected == []
                    continue
                length = batch.resp[pair, 0, PROMPT:].sum()
                assert chosen == [50 + n] * length
                resp = batch.resp[pair, 1, PROMPT:] == 1
                assert rejected == batch.tokens[pair, 1, PROMPT:][resp].tolist()

"""The optimizers and schedule against PyTorch's and transformers' (design §7): `rmsprop` is
`torch.optim.RMSprop`'s defaults, `adamw` `torch.optim.AdamW`'s, the schedule
`get_linear_schedule_with_warmup` with TRL's warm-up length; with `train.schedule:
per_iteration` each iteration starts from fresh optimizer state, like a separate run."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from models import ModelConfig
from optune_jax import sharding
from optune_jax.batch import PairBatch
from optune_jax.components import build_layout
from optune_jax.optimizer import (
    build_optimizer,
    create_state,
    fresh_opt_state,
    make_optimizer,
    scale_by_linear_schedule,
)
from optune_jax.policy_trainer import PolicyTrainer
from optune_jax.run.config_file import load_config
from optune_jax.run.guard import NonFiniteGuard
from optune_jax.train_step import LossChoice, PolicySpec, train_step

STEPS = 20


def _gradients(shape=(6, 8), seed=0):
    """STEPS gradients, each element of its own scale between 1e-6 and 1 (eps matters at the
    small end: 1e-8 next to sqrt(1 - alpha) × 1e-6 = 1e-7)."""
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 0, shape) for _ in range(STEPS)
    ]


def _torch_run(make, p0, grads, warmup):
    p = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    opt = make([p])
    sched = get_linear_schedule_with_warmup(opt, warmup, len(grads))
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        sched.step()
    return p.detach().numpy()


def _ours(opt, p0, grads):
    p = jnp.asarray(p0, jnp.float32)
    state = opt.init(p)
    update = jax.jit(opt.update)
    for g in grads:
        u, state = update(jnp.asarray(g, jnp.float32), state, p)
        p = optax.apply_updates(p, u)
    return np.asarray(p, np.float64)


@pytest.mark.parametrize("name", ["rmsprop", "adamw"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_optimizer_matches_torch_over_a_decaying_schedule(name, weight_decay):
    lr = 1e-2
    p0 = np.random.default_rng(1).standard_normal((6, 8))
    grads = _gradients()
    torch_opt = {
        "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=lr, weight_decay=weight_decay),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=weight_decay),
    }[name]
    want = _torch_run(torch_opt, p0, grads, warmup=math.ceil(0.1 * STEPS))
    ours = make_optimizer(
        name=name, learning_rate=lr, total_steps=STEPS, warmup_ratio=0.1,
        weight_decay=weight_decay, max_grad_norm=None, decay=True,
    )
    got = _ours(ours, p0, grads)
    assert np.max(np.abs(got - want) / np.abs(want)) < 1e-4
    # the displacement too, at the scale of the steps taken (lr per element, ~10 lr for
    # RMSprop's first ones): eps in the root, or alpha 0.9, is off by far more
    moved = np.max(np.abs(want - p0))
    assert moved > lr and np.max(np.abs(got - want)) < 1e-4 * moved


def _lr_sequence(opt, state, n):
    """The learning rates (scale of a unit update) of `n` updates from `state`."""
    update = jax.jit(opt.update)
    lrs = []
    for _ in range(n):
        u, state = update(jnp.ones(()), state)
        lrs.append(-float(u))
    return np.array(lrs)


@pytest.mark.parametrize("n", [7, 10, 30])  # 30: ceil(0.1 × 30) = 4 in float64 (TRL's)
def test_schedule_restarted_over_n_steps_is_transformers_linear_warmup_decay(n):
    torch_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_linear_schedule_with_warmup(torch_opt, math.ceil(0.1 * n), n)
    want = []
    for _ in range(n):
        want.append(sched.get_last_lr()[0])
        torch_opt.step()
        sched.step()
    assert want[0] == 0.0 and want[-1] > 0.0
    # built for another length, then restarted as a new iteration's run of n steps
    opt = scale_by_linear_schedule(1.0, steps=50, warmup_ratio=0.1, decay=True)
    state = opt.init(jnp.zeros(()))
    state = opt.update(jnp.ones(()), state)[1]  # an update of the previous run
    got = _lr_sequence(opt, fresh_opt_state(opt, jnp.zeros(()), n, math.ceil(0.1 * n)), n)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # continuous: the same warm-up, then constant
    opt = scale_by_linear_schedule(1.0, steps=n, warmup_ratio=0.1, decay=False)
    got = _lr_sequence(opt, opt.init(jnp.zeros(())), n)
    w = math.ceil(0.1 * n)
    np.testing.assert_allclose(got, [min(c / w, 1.0) for c in range(n)], rtol=1e-6)


# a tiny random policy (vocabulary 32) trained by PolicyTrainer on random pairs
POLICY = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8)
PROMPT, RESP = 6, 5


def _pairs(k, seed):
    rng = np.random.default_rng(seed)
    width = PROMPT + RESP
    tokens = rng.integers(1, 32, (k, 2, width)).astype(np.int32)
    tokens[:, 1, :PROMPT] = tokens[:, 0, :PROMPT]  # one prompt, two responses
    attn = np.ones((k, 2, width), np.int32)
    resp = np.zeros((k, 2, width), np.int32)
    resp[:, :, PROMPT:] = 1
    return PairBatch(
        tokens=tokens,
        attn=attn,
        resp=resp,
        ref_logps=rng.standard_normal((k, 2)).astype(np.float32) - 20,
        rewards=np.tile(np.array([1.0, 0.0], np.float32), (k, 1)),
        pair_mask=np.ones((k,), bool),
    )


def test_per_iteration_starts_each_iteration_like_a_separate_run():
    """Iteration 1 from iteration 0's state (moments and schedule well under way) equals
    iteration 1 from a state created anew around the same parameters; the schedule runs over
    the steps iteration 1 takes (fewer pairs than planned), and the state keeps its shards."""
    cfg = load_config("configs/tiny.yaml", [
        "train.optimizer=rmsprop", "train.learning_rate=1e-3", "train.warmup_ratio=0.1",
        "train.schedule=per_iteration", "train.epochs=2", "train.batch_size=4",
        "train.micro_batch_size=2", f"data.max_prompt_tokens={PROMPT}",
    ])
    layout = build_layout(cfg.mesh)
    mesh = layout.mesh
    params = sharding.init_sharded_params(POLICY, jax.random.key(0), layout)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    plan = build_optimizer(cfg.train, updates_per_iteration=2 * 2)  # 8 pairs, 2 epochs of 2 steps
    opt = plan.transform
    state, shardings = create_state(params, opt, mesh)
    batch_sharding = sharding.batch_sharding(layout, cfg.train.micro_batch_size, axis=1)
    step = sharding.jit_train_step(
        functools.partial(
            train_step, optimizer=opt, policy=PolicySpec(POLICY),
            loss=LossChoice.from_values(cfg.loss.name,
                                        dict(beta=cfg.loss.beta, beta2=cfg.loss.beta2)),
            prompt_len=cfg.data.max_prompt_tokens, lora=None,
        ),
        layout, state_shardings=shardings, batch_sharding=batch_sharding,
    )
    trainer = PolicyTrainer(
        cfg.train, seed=cfg.run.seed, step=step, batch_sharding=batch_sharding, plan=plan,
        state_shardings=shardings, prompt_len=cfg.data.max_prompt_tokens, model=POLICY,
        progress=False,
    )
    state, _ = trainer.train(state, _pairs(8, seed=0), 0, guard=NonFiniteGuard(3))
    schedule = optax.tree_utils.tree_get(state.opt_state, "ScheduleState")
    assert int(schedule.count) == 4 and int(schedule.run_steps) == 4
    assert float(jnp.max(jax.tree.leaves(optax.tree_utils.tree_get(state.opt_state, "nu"))[0])) > 0
    fresh = create_state(
        jax.device_put(jax.device_get(state.params), param_shardings), opt, mesh
    )[0]
    batch = _pairs(3, seed=1)  # 3 pairs (ties dropped): 2 epochs of 1 step
    got, got_metrics = trainer.train(state, batch, 1, guard=NonFiniteGuard(3))
    want, want_metrics = trainer.train(fresh, batch, 1, guard=NonFiniteGuard(3))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got.params),
                 jax.device_get(want.params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got.opt_state),
                 jax.device_get(want.opt_state))
    assert got_metrics["loss"] == want_metrics["loss"]
    schedule = optax.tree_utils.tree_get(got.opt_state, "ScheduleState")
    assert [int(x) for x in schedule] == [2, 2, 1]  # count, run_steps, run_warmup
    for x, s in zip(jax.tree.leaves(got), jax.tree.leaves(shardings), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim)

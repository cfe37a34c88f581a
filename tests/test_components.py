"""One builder per program: the dry run lowers the very train step the trainer runs
(`components.train_program`), on inputs laid out as the trainer's."""

import dataclasses

import jax
import pytest

from optune_jax import dryrun
from optune_jax.loop import OptuneRun

from .test_loop import micro_config


def _avals(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)


@pytest.mark.parametrize("extra", [(), ("lora.rank=2",)], ids=["full", "lora"])
def test_the_dry_run_lowers_the_program_the_trainer_runs(tmp_path, extra):
    """The trainer's jitted step and the dry run's, lowered on the same inputs, are one program,
    and the dry run's abstract state is the run's state (shapes, dtypes, shardings)."""
    cfg = micro_config(tmp_path, *extra)
    run = OptuneRun(cfg, progress=False)
    try:
        config = run.policy.config
        lowered, (state, batch, frozen, _, lora) = dryrun.lower_train_step(cfg, config, run.layout)
        assert (lora is None) == (not extra)
        assert _avals(state) == _avals(run.state)
        assert _avals(frozen) == _avals(run.frozen)
        ran = run.trainer.step.lower(run.state, batch, run.frozen)
        assert ran.as_text() == lowered.as_text()
        # the comparison sees a difference in what is trained: another β is another program
        other = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, beta=0.2))
        changed, _ = dryrun.lower_train_step(other, config, run.layout)
        assert changed.as_text() != ran.as_text()
    finally:
        run.close()

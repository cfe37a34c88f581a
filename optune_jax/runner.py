"""The outer loop both trainers share: run directory, checkpoints, metrics, resume, export.

A trainer (`OptuneRun`: one step is an OPTune iteration; `RewardModelRun`: an epoch) builds its
state, then calls `_open`; `run` does the rest. Every metrics line is written before its
checkpoint: a stop between them leaves a line past the newest checkpoint, which a resume drops
and writes again (the other order would lose it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from optune_jax import distributed
from optune_jax.checkpoint import Checkpoints
from optune_jax.config import config_to_dict
from optune_jax.errors import RunError
from optune_jax.metrics_log import MetricsLog
from optune_jax.run_dir import prepare_run_dir, replace_dir
from optune_jax.train_step import NonFiniteGuard


class Runner:
    """Subclasses set `cfg`, `state` (a TrainState on the devices) and `guard`, and implement
    `_before`, `_step`, `_line`, `_host_state`, `_restored`, `_export_params`, `_write_model`."""

    unit = "iteration"  # what one step of the outer loop is called in metrics and bars
    resumable: tuple[str, ...] = ()  # config keys a resumed run may change
    desc = "run"

    cfg: object
    state: object
    guard: NonFiniteGuard

    def _open(self, *, steps: int, resume: bool, overwrite: bool, progress: bool) -> None:
        """Makes the output directory ready, restores the newest good checkpoint when resuming
        and opens the metrics log; `steps` is the outer loop's length."""
        self.out, self.progress, self.steps = Path(self.cfg.run.output_dir), progress, steps
        if distributed.is_primary():  # one process checks and writes the shared directory
            prepare_run_dir(
                self.out,
                config_to_dict(self.cfg),
                resume=resume,
                overwrite=overwrite,
                resumable=self.resumable,
            )
        distributed.barrier("output dir ready")
        self.next_step = 0
        self.ckpt = Checkpoints(self.out / "checkpoints", keep=self.cfg.run.keep_checkpoints)
        if resume:
            self._restore()
        self.log = MetricsLog(self.out, resume_after=self.next_step - 1)

    def _restore(self) -> None:
        """Continues from the newest good checkpoint (damaged ones are set aside, with a line
        on stderr saying which and why); without one the run starts afresh."""
        found = self.ckpt.restore_newest(state_like=self.state, host_like=self._host_state())
        distributed.barrier("checkpoints verified")
        if found.note and distributed.is_primary():
            tqdm.write(f"warning: {found.note}", file=sys.stderr)
        if found.step is None:
            return
        self.state = found.state
        self.guard.in_a_row = found.meta.get("skipped_in_a_row", 0)
        self.next_step = found.meta[f"next_{self.unit}"]
        self._restored(found.host, found.meta)

    def run(self) -> list[dict]:
        """Runs the remaining steps; returns every metrics record (step -1: before training)."""
        if self.next_step == 0:
            self.log.write({"iteration": -1, **self._before()})
        for t in tqdm(
            range(self.next_step, self.steps),
            desc=self.desc,
            unit=self.unit,
            disable=not self.progress,
            initial=self.next_step,
            total=self.steps,
        ):
            record = {"iteration": t, **self._step(t)}  # MetricsLog's step key
            self.log.write(record)
            self.next_step = t + 1
            self.ckpt.save(
                t,
                state=self.state,
                host=self._host_state(),
                meta={
                    f"next_{self.unit}": t + 1,
                    "skipped_in_a_row": self.guard.in_a_row,
                    "config": config_to_dict(self.cfg),
                    **self._meta(),
                },
            )
            if distributed.is_primary():
                tqdm.write(self._line(record))
        return self.log.read()

    def export(self) -> Path:
        """The model as a transformers checkpoint in `output_dir/model`, written beside it and
        renamed when complete; refused (RunError) for non-finite parameters."""
        params = distributed.get(self._export_params())  # every process joins the gather
        out = self.out / "model"
        if distributed.is_primary():
            if not all(np.isfinite(x).all() for x in jax.tree.leaves(params)):
                raise RunError(f"not exporting {out}: the parameters hold NaN or infinite values")
            replace_dir(out, lambda path: self._write_model(params, path))
        distributed.barrier("exported")
        return out

    def describe_data(self) -> str:
        """One line for the console about the data used ("" for none)."""
        return ""

    def close(self) -> None:
        self.log.close()
        self.ckpt.close()

    # ------------------------------------------------------------------ the trainer's part
    def _before(self) -> dict:
        raise NotImplementedError

    def _step(self, t: int) -> dict:
        raise NotImplementedError

    def _line(self, record: dict) -> str:
        raise NotImplementedError

    def _host_state(self) -> dict:
        raise NotImplementedError

    def _restored(self, host: dict, meta: dict) -> None:
        """Takes the host state and metadata of a restored checkpoint."""

    def _meta(self) -> dict:
        """Metadata saved with each checkpoint besides the step, guard and config."""
        return {}

    def _export_params(self):
        """The parameters to export (on the devices or the host)."""
        raise NotImplementedError

    def _write_model(self, params, path: Path) -> None:
        """Writes host `params` as a transformers checkpoint into the directory `path`."""
        raise NotImplementedError

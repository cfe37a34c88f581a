"""The outer loop both trainers share: run directory, checkpoints, metrics, resume, export.

A trainer (`OptuneRun`: one step is an OPTune iteration; `RewardModelRun`: an epoch) builds its
state, then calls `_open`; `run` does the rest. Every metrics line is written before its
checkpoint: a stop between them leaves a line past the newest checkpoint, which a resume drops
and writes again (the other order would lose it). The checkpoint keeps its line too, so a line
lost after its checkpoint completed (a write cut short) is written again on resume. The run
holds its directory's lock (`RunLock`) until `close`; a stopping signal (`signals`) never cuts a
line and its checkpoint apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from optune_jax.run import distributed, signals
from optune_jax.run.checkpoint import Checkpoints
from optune_jax.run.config_file import config_to_dict
from optune_jax.run.errors import RunError
from optune_jax.run.guard import NonFiniteGuard
from optune_jax.run.metrics_log import MetricsLog, strict
from optune_jax.run.run_dir import RunLock, prepare_run_dir, replace_dir


class Runner:
    """Subclasses set `cfg`, `state` (a TrainState on the devices) and `guard`, and implement
    `_before`, `_step`, `_line`, `_host_state`, `_restored`, `_export_params`, `_write_model`."""

    unit = "iteration"  # what one step of the outer loop is called in metrics and bars
    resumable: tuple[str, ...] = ()  # config keys a resumed run may change
    desc = "run"

    cfg: object
    state: object
    guard: NonFiniteGuard

    def _open(self, *, steps: int, resume: bool | str, overwrite: bool, progress: bool) -> None:
        """Makes the output directory ready, restores the newest good checkpoint when resuming
        and opens the metrics log; `steps` is the outer loop's length. `resume`: True (refused
        without a checkpoint) or "auto" (a checkpoint if there is one, else a fresh start)."""
        self.out, self.progress, self.steps = Path(self.cfg.run.output_dir), progress, steps
        self._lock = self.log = self.ckpt = None
        if distributed.is_primary():  # one process checks and writes the shared directory
            self._lock = RunLock(self.out, resume=resume)
        try:
            self._open_locked(resume, overwrite)
        except BaseException:
            self.close()  # the lock (and whatever opened) let go at once, not at collection
            raise

    def _open_locked(self, resume, overwrite) -> None:
        if distributed.is_primary():
            prepare_run_dir(
                self.out,
                config_to_dict(self.cfg),
                resume=resume,
                overwrite=overwrite,
                resumable=self.resumable,
            )
        distributed.barrier("output dir ready")
        self.next_step, self._resume = 0, resume
        self.ckpt = Checkpoints(self.out / "checkpoints", keep=self.cfg.run.keep_checkpoints)
        meta = self._restore() if resume else None
        self.log = MetricsLog(self.out, resume_after=self.next_step - 1)
        if meta is not None and distributed.is_primary():
            self._rewrite_lost_lines(meta)

    def _say(self, line: str) -> None:
        if distributed.is_primary():
            tqdm.write(line, file=sys.stderr)

    def _restore(self) -> dict | None:
        """Continues from the newest good checkpoint (damaged ones are set aside, with a line
        on stderr saying which and why) and says so; returns its metadata. Refuses a directory
        with no checkpoint at all; one whose every checkpoint is damaged starts afresh."""
        found = self.ckpt.restore_newest(state_like=self.state, host_like=self._host_state())
        distributed.barrier("checkpoints verified")
        if found.note:
            self._say(f"warning: {found.note}")
        if found.step is None:
            if found.damaged:
                return None
            if self._resume == "auto":
                self._say(f"note: {self.out} holds no checkpoint yet: starting afresh")
                return None
            raise RunError(
                f"cannot resume {self.out}: it holds no checkpoint (the run stopped before its "
                f"first {self.unit} ended); start it afresh with --overwrite"
            )
        self.state = found.state
        self.guard.in_a_row = found.meta.get("skipped_in_a_row", 0)
        self.next_step = found.meta[f"next_{self.unit}"]
        self._restored(found.host, found.meta)
        left = self.steps - self.next_step
        done = f"{self.unit} 0" if found.step == 0 else f"{self.unit}s 0-{found.step}"
        self._say(f"resuming {self.out} from checkpoint {found.step}: {done} done, "
                  f"{max(left, 0)} to go")
        return found.meta

    def _rewrite_lost_lines(self, meta: dict) -> None:
        """Writes again the metrics lines of the restored checkpoint (and the initial
        evaluation's) that metrics.jsonl lost after the checkpoint completed."""
        have = {r["iteration"] for r in self.log.read()}
        lost = [r for r in (meta.get("initial_record"), meta.get("record"))
                if r is not None and r["iteration"] not in have]
        if not lost:
            return
        lines = self.log.read() + lost
        self.log.rewrite(sorted(lines, key=lambda r: r["iteration"]))
        which = ", ".join(str(r["iteration"]) for r in lost)
        self._say(f"note: {self.log.path} had no complete line for {self.unit} {which}; "
                  "written again from the checkpoint")

    def run(self) -> list[dict]:
        """Runs the remaining steps; returns every metrics record (step -1: before training)."""
        if self.next_step == 0:
            self._initial = {"iteration": -1, **self._before()}
            self.log.write(self._initial)
        for t in tqdm(
            range(self.next_step, self.steps),
            desc=self.desc,
            unit=self.unit,
            disable=not self.progress,
            initial=self.next_step,
            total=self.steps,
        ):
            record = {"iteration": t, **self._step(t)}  # MetricsLog's step key
            signals.check()  # a stop during the step abandons it, even if its raise was lost
            with signals.deferred():  # a stop waits for the line and its checkpoint
                self.log.write(record)
                self.ckpt.save(
                    t,
                    state=self.state,
                    host=self._host_state(),
                    meta={
                        f"next_{self.unit}": t + 1,
                        "skipped_in_a_row": self.guard.in_a_row,
                        "config": config_to_dict(self.cfg),
                        "record": strict(record),
                        "initial_record": strict(self._initial) if t == 0 else None,
                        **self._meta(),
                    },
                )
                self.next_step = t + 1
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
        """Closes the log and checkpoints and lets go of the directory (safe to call twice)."""
        for part in (self.log, self.ckpt):
            if part is not None:
                part.close()
        self.log = self.ckpt = None
        if self._lock is not None:
            self._lock.release()

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

"""Runner, the outer loop both trainers share, with a tiny fake trainer: the run directory,
metrics.jsonl, a checkpoint per step (run.keep_checkpoints of them), resume (after a signal, a
longer run, lost or stale metrics lines), --overwrite, the refusals, and the export.

The fake's state is {"w": float32[4], "n": int32}; step t makes w <- scale * w + t and n <- n + 1
(exact in float32 for these sizes), and its host state sums t * t: every value below is computed
by hand from that rule (`expected`), never read back from the code under test."""

import dataclasses
import json
import os
import signal
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from optune_jax.run import signals
from optune_jax.run.config_file import load_config
from optune_jax.run.errors import RunError
from optune_jax.run.guard import NonFiniteGuard
from optune_jax.run.runner import Runner
from optune_jax.run.schema import POSITIVE, option, section

W0 = [0.0, 1.0, 2.0, 3.0]
STEPS = 3


@dataclasses.dataclass(frozen=True)
class TinyRunSection:
    output_dir: str = "runs/tiny"
    keep_checkpoints: int = option(2, range=POSITIVE)


@dataclasses.dataclass(frozen=True)
class TinyTrainSection:
    steps: int = option(STEPS, range=POSITIVE)
    scale: float = 2.0  # not resumable: a resumed run must keep it


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    run: TinyRunSection = section(TinyRunSection)
    train: TinyTrainSection = section(TinyTrainSection)


def config(out: Path, *sets: str) -> TinyConfig:
    return load_config(None, [f"run.output_dir={out}", *sets], schema=TinyConfig)


class TinyRun(Runner):
    """A trainer whose step is w <- scale * w + t; `stop=("step", k)` sends SIGTERM inside step
    k, `stop=("save", k)` while step k's line and checkpoint are being written."""

    unit, desc = "epoch", "tiny"
    resumable = ("run.output_dir", "run.keep_checkpoints", "train.steps")

    def __init__(self, cfg, *, resume=False, overwrite=False, progress=False, stop=None):
        self.cfg, self.stop, self.restored = cfg, stop, None
        self.state = {"w": jnp.asarray(W0, jnp.float32), "n": jnp.zeros((), jnp.int32)}
        self.total = 0  # host state: the sum of t * t over the steps done
        self.guard = NonFiniteGuard(3)
        self._open(steps=cfg.train.steps, resume=resume, overwrite=overwrite, progress=progress)

    def _before(self) -> dict:
        return {"w_sum": float(self.state["w"].sum())}

    def _step(self, t: int) -> dict:
        if self.stop == ("step", t):
            _sigterm()
        self.state = {"w": self.cfg.train.scale * self.state["w"] + t, "n": self.state["n"] + 1}
        self.total += t * t
        self.guard.in_a_row = t % 2  # saved with the checkpoint, restored on resume
        return {"w_sum": float(self.state["w"].sum()), "total": self.total}

    def _line(self, record: dict) -> str:
        return f"epoch {record['iteration']}: w_sum {record['w_sum']}"

    def _host_state(self) -> dict:
        if self.stop == ("save", self.next_step):
            _sigterm(now=False)  # inside `signals.deferred`: raised once the checkpoint is done
        return {"total": np.asarray(self.total, np.int64)}

    def _restored(self, host: dict, meta: dict) -> None:
        self.total = int(host["total"])
        self.restored = meta["label"]

    def _meta(self) -> dict:
        return {"label": f"after epoch {self.next_step}"}

    def _export_params(self):
        return self.state

    def _write_model(self, params, path: Path) -> None:
        path.mkdir()
        np.save(path / "w.npy", params["w"])


def _sigterm(*, now: bool = True) -> None:
    """SIGTERM to this process; `now`: its handler must raise at once (outside `deferred`)."""
    os.kill(os.getpid(), signal.SIGTERM)
    signal.sigtimedwait([], 0)  # the handler runs here
    if now:
        raise AssertionError("SIGTERM did not stop the run")


def expected(steps: int, scale: float = 2.0) -> tuple[np.ndarray, list[dict]]:
    """(w after `steps` steps, the records of epochs -1..steps-1), by hand from the rule."""
    w, total = [*W0], 0
    records = [{"iteration": -1, "w_sum": sum(W0)}]
    for t in range(steps):
        w = [scale * x + t for x in w]
        total += t * t
        records.append({"iteration": t, "w_sum": sum(w), "total": total})
    return np.asarray(w, np.float32), records


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir())


def _finish(run: TinyRun) -> tuple[dict, list[dict]]:
    """Runs to the end and closes: (the final state on the host, the records returned)."""
    try:
        records = run.run()
        return _host(run.state), records
    finally:
        run.close()


def _host(state: dict) -> dict:
    return {k: np.asarray(v) for k, v in state.items()}


def _stopped(cfg, stop) -> TinyRun:
    """A run stopped by SIGTERM at `stop` (closed, as cli closes it)."""
    run = TinyRun(cfg, stop=stop)
    with pytest.raises(signals.Interrupted), signals.stop_on_signals():
        try:
            run.run()
        finally:
            run.close()
    return run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A run of STEPS epochs from start to end: (final state, records returned, its directory)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    state, records = _finish(TinyRun(config(out)))
    return state, records, out


def test_a_run_logs_every_epoch_and_keeps_the_newest_checkpoints(uninterrupted, capsys):
    """STEPS epochs: metrics.jsonl holds epochs -1..STEPS-1 with the hand-computed values, run()
    returns the same records, run.keep_checkpoints=2 keeps the newest two steps, config.yaml
    holds the config, and the state is the hand-computed one."""
    state, records, out = uninterrupted
    want_w, want = expected(STEPS)
    assert records == want and _records(out) == want
    np.testing.assert_array_equal(state["w"], want_w)
    assert state["w"].dtype == np.float32 and int(state["n"]) == STEPS
    assert _checkpoints(out) == [STEPS - 2, STEPS - 1]
    assert yaml.safe_load((out / "config.yaml").read_text()) == {
        "run": {"output_dir": str(out), "keep_checkpoints": 2},
        "train": {"steps": STEPS, "scale": 2.0}}


def test_keep_checkpoints_is_how_many_steps_stay(tmp_path, capsys):
    """run.keep_checkpoints=1 keeps only the newest step (2, the default, is checked above)."""
    out = tmp_path / "run"
    _finish(TinyRun(config(out, "run.keep_checkpoints=1")))
    assert _checkpoints(out) == [STEPS - 1]


@pytest.mark.parametrize("stop, next_step", [
    (("step", 2), 2),  # step 2 abandoned: checkpoint 1 is the newest
    (("step", 0), 0),  # nothing checkpointed: the run starts over
    (("save", 1), 2),  # the signal waits for step 1's line and checkpoint
], ids=["in-step-2", "in-step-0", "in-save-1"])
def test_a_stopped_run_resumes_to_the_uninterrupted_state(stop, next_step, uninterrupted,
                                                          tmp_path, capsys):
    """SIGTERM inside a step abandons it; during the line and checkpoint it waits for both. The
    resumed (auto-resumed when nothing was checkpointed) run continues from the step after the
    newest checkpoint, with its host state, metadata and guard count, and ends with exactly the
    uninterrupted run's state, metrics.jsonl and records."""
    want_state, want_records, _ = uninterrupted
    out = tmp_path / "run"
    stopped = _stopped(config(out), stop)
    assert stopped.next_step == next_step
    assert _checkpoints(out) == [t for t in (next_step - 2, next_step - 1) if t >= 0]
    assert [r["iteration"] for r in _records(out)] == list(range(-1, next_step))
    capsys.readouterr()
    run = TinyRun(config(out), resume=True if next_step else "auto")
    assert run.next_step == next_step
    if next_step:
        assert (run.total, run.restored) == (sum(t * t for t in range(next_step)),
                                             f"after epoch {next_step - 1}")
        assert run.guard.in_a_row == (next_step - 1) % 2
        assert capsys.readouterr().err == (
            f"resuming {out} from checkpoint {next_step - 1}: epochs 0-{next_step - 1} done, "
            f"{STEPS - next_step} to go\n")
    else:
        assert capsys.readouterr().err == f"note: {out} holds no checkpoint yet: starting afresh\n"
    state, records = _finish(run)
    for key in ("w", "n"):
        np.testing.assert_array_equal(state[key], want_state[key])
    assert records == want_records and _records(out) == want_records
    assert _checkpoints(out) == [STEPS - 2, STEPS - 1]


def test_a_longer_run_resumes_a_finished_one(uninterrupted, tmp_path, capsys):
    """train.steps is resumable: 2 epochs, then resumed with STEPS, equal the uninterrupted run;
    resuming a finished run runs nothing and returns its records."""
    want_state, want_records, _ = uninterrupted
    out = tmp_path / "run"
    _finish(TinyRun(config(out, "train.steps=2")))
    state, records = _finish(TinyRun(config(out), resume=True))
    np.testing.assert_array_equal(state["w"], want_state["w"])
    assert records == want_records
    capsys.readouterr()
    again = TinyRun(config(out), resume=True)
    assert again.next_step == STEPS
    state, records = _finish(again)
    np.testing.assert_array_equal(state["w"], want_state["w"])
    assert records == want_records and _checkpoints(out) == [STEPS - 2, STEPS - 1]
    assert capsys.readouterr().err == (
        f"resuming {out} from checkpoint {STEPS - 1}: epochs 0-{STEPS - 1} done, 0 to go\n")


def test_lost_and_stale_metrics_lines_are_mended_on_resume(uninterrupted, tmp_path, capsys):
    """A resume writes again from the checkpoint the lines metrics.jsonl lost (here epochs -1
    and 0, the file cut short mid-line), says so, and drops a line written past the newest
    checkpoint; the records end as the uninterrupted run's."""
    _, want_records, _ = uninterrupted
    out = tmp_path / "run"
    _stopped(config(out), ("step", 1))
    log = out / "metrics.jsonl"
    log.write_text('{"iteration": -1, "w_s')  # torn: both lines lost
    capsys.readouterr()
    run = TinyRun(config(out), resume=True)
    assert _records(out) == want_records[:2]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"note: {log} had no complete line for epoch -1, 0; written again from the checkpoint")
    run.close()
    with log.open("a") as f:  # a line whose checkpoint never completed
        f.write(json.dumps({"iteration": 1, "w_sum": 999.0}) + "\n")
    _, records = _finish(TinyRun(config(out), resume=True))
    assert records == want_records and _records(out) == want_records


def test_overwrite_clears_the_directory(uninterrupted, tmp_path, capsys):
    """--overwrite deletes what the directory holds (checkpoints, metrics, stray files) before
    the run starts afresh, and the new run ends as a fresh one."""
    want_state, want_records, _ = uninterrupted
    out = tmp_path / "run"
    _stopped(config(out, "train.scale=3.0"), ("step", 2))
    (out / "notes.txt").write_text("mine")
    run = TinyRun(config(out), overwrite=True)
    assert not (out / "notes.txt").exists() and not (out / "metrics.jsonl").exists()
    assert _checkpoints(out) == []
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["scale"] == 2.0
    state, records = _finish(run)
    np.testing.assert_array_equal(state["w"], want_state["w"])
    assert records == want_records


@pytest.mark.parametrize("holds, mode, line", [
    ("stray", {}, "{out} exists and is not an optune-jax run directory; choose another "
                  "run.output_dir or overwrite it"),
    ("run", {}, "{out} already holds a run; resume it or overwrite it"),
    ("nothing", {"resume": True}, "cannot resume {out}: it holds no run (no config.yaml); check "
                                  "the path, or start a new run there without --resume"),
    ("no checkpoint", {"resume": True}, "cannot resume {out}: it holds no checkpoint (the run "
     "stopped before its first epoch ended); start it afresh with --overwrite"),
    ("run", {"resume": True, "sets": ["train.scale=3.0"]},
     "cannot resume {out}: its checkpoint was made with a different config (train.scale); "
     "choose another output directory or overwrite it"),
], ids=["stray-file", "a-run", "resume-nothing", "resume-no-checkpoint", "changed-key"])
def test_a_start_that_would_clobber_or_mismatch_is_refused(holds, mode, line, tmp_path, capsys):
    """Refused in one line naming the directory (and a changed non-resumable key): a stray file,
    a run without --resume/--overwrite, --resume with no run or no checkpoint, a resume with a
    changed train.scale. Nothing is changed, and the directory's lock is let go."""
    out = tmp_path / "run"
    if holds == "stray":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif holds == "run":
        _stopped(config(out), ("step", 1))
    elif holds == "no checkpoint":
        TinyRun(config(out)).close()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    mode = dict(mode)
    sets = mode.pop("sets", [])
    with pytest.raises(RunError) as info:
        TinyRun(config(out, *sets), **mode)
    assert str(info.value) == line.format(out=out)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.name != ".lock"} == {
        k: v for k, v in before.items() if k.name != ".lock"}
    TinyRun(config(out), overwrite=True).close()  # the refused run holds no lock


def test_a_changed_resumable_key_is_accepted(tmp_path, capsys):
    """run.keep_checkpoints is resumable: a resume with another value goes on, keeping the new
    number of checkpoints."""
    out = tmp_path / "run"
    _stopped(config(out), ("step", 1))
    _finish(TinyRun(config(out, "run.keep_checkpoints=3"), resume=True))
    assert _checkpoints(out) == [STEPS - 3, STEPS - 2, STEPS - 1]


def test_export_writes_the_model_and_refuses_non_finite_parameters(tmp_path, capsys):
    """export() writes output_dir/model (no .partial left) with the final parameters; NaN
    parameters are refused in one line and the earlier export stays as it was."""
    out = tmp_path / "run"
    run = TinyRun(config(out, "train.steps=2"))
    try:
        run.run()
        assert run.export() == out / "model"
        want_w, _ = expected(2)
        np.testing.assert_array_equal(np.load(out / "model" / "w.npy"), want_w)
        run.state = {**run.state, "w": run.state["w"].at[1].set(jnp.nan)}
        with pytest.raises(RunError) as info:
            run.export()
        assert str(info.value) == (f"not exporting {out / 'model'}: the parameters hold NaN or "
                                   "infinite values")
        np.testing.assert_array_equal(np.load(out / "model" / "w.npy"), want_w)
        assert not (out / "model.partial").exists()
    finally:
        run.close()
        run.close()  # safe twice
    assert run.describe_data() == ""

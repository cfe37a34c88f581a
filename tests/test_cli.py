"""The trainers' command line (optune_jax.run.cli) with a fake run: its flags, the one-line
errors and exit codes, summary.md, the export, close, and where a stopped run stands.

No model is built: `FakeRun` has only what cli uses of a run (unit, steps, next_step, out, run,
export, close, describe_data), and its behaviour comes from its tiny config (`fake.fail`)."""

import dataclasses
import errno
import os
import re
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from optune_jax.run import cli
from optune_jax.run.cli import Trainer, make_parser, report_error, write_summary
from optune_jax.run.errors import RunError
from optune_jax.run.schema import POSITIVE, option, section

SIGNALLED = ("SIGTERM", "SIGINT")
FAILS = ("", "init", "init_signal", "run", "export", *SIGNALLED)


@dataclasses.dataclass(frozen=True)
class FakeRunSection:
    output_dir: str = "runs/fake"
    compilation_cache: str | None = None


@dataclasses.dataclass(frozen=True)
class FakeSection:
    steps: int = option(3, range=POSITIVE)  # the run's length
    done: int = option(3, range="[0, inf)")  # next_step once run() ends (or is stopped)
    fail: str = option("", choices=FAILS)  # where the fake run fails or is stopped


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    run: FakeRunSection = section(FakeRunSection)
    fake: FakeSection = section(FakeSection)


def _stop(name: str) -> None:
    """Sends the signal `name` to this process and lets its handler run."""
    os.kill(os.getpid(), signal.Signals[name])
    signal.sigtimedwait([], 0)
    raise AssertionError(f"{name} did not stop the run")


class FakeRun:
    """A run as cli sees it: `run()` returns the metrics records of iterations -1..done-1."""

    unit = "iteration"
    built: list = []  # every FakeRun made, in order (emptied before each test)

    def __init__(self, cfg, *, resume, overwrite, progress):
        FakeRun.built.append(self)
        self.cfg, self.calls = cfg, []
        self.kwargs = dict(resume=resume, overwrite=overwrite, progress=progress)
        self.out, self.steps, self.next_step = Path(cfg.run.output_dir), cfg.fake.steps, 0
        if cfg.fake.fail == "init":
            raise RunError(f"{self.out} already holds a run; resume it or overwrite it")
        if cfg.fake.fail == "init_signal":
            _stop("SIGTERM")
        self.out.mkdir(parents=True, exist_ok=True)

    def describe_data(self) -> str:
        self.calls.append("describe_data")
        return f"data: {self.steps} fake prompts"

    def run(self) -> list[dict]:
        self.calls.append("run")
        fail, self.next_step = self.cfg.fake.fail, self.cfg.fake.done
        if fail == "run":
            raise RunError("iteration 1: 3 optimizer steps in a row were skipped")
        if fail in SIGNALLED:
            _stop(fail)
        return [{"iteration": t, "loss": 1.0 / (t + 2)} for t in range(-1, self.next_step)]

    def export(self) -> Path:
        self.calls.append("export")
        if self.cfg.fake.fail == "export":
            raise RunError(f"not exporting {self.out / 'model'}: the parameters hold NaN")
        return self.out / "model"

    def close(self) -> None:
        self.calls.append("close")


@pytest.fixture(autouse=True)
def _no_runs_yet():
    FakeRun.built.clear()
    yield
    FakeRun.built.clear()


def _table(records: list[dict]) -> str:
    rows = [f"| {r['iteration']} | {r['loss']:.2f} |" for r in records]
    return "\n".join(["| iteration | loss |", "| --- | --- |", *rows])


def _headline(records: list[dict], out: Path) -> str:
    return f"In words: the loss fell from {records[0]['loss']:.2f} to {records[-1]['loss']:.2f}" \
           f" ({out.name})."


TABLE = """\
| iteration | loss |
| --- | --- |
| -1 | 1.00 |
| 0 | 0.50 |
| 1 | 0.33 |
| 2 | 0.25 |"""
HEADLINE = "In words: the loss fell from 1.00 to 0.25 (run)."


def _trainer(**kw) -> Trainer:
    return Trainer(prog="fake-train", description="Train nothing.", schema=FakeConfig,
                   run=FakeRun, summary_table=_table, exported="fake model",
                   **{"headline": _headline, **kw})


def _argv(tmp_path: Path, *sets: str, flags=("--no-progress",)) -> list[str]:
    config = tmp_path / "fake.yaml"
    config.write_text(f"run:\n  output_dir: {tmp_path / 'run'}\nfake:\n  steps: 3\n")
    return ["--config", str(config), *[x for s in sets for x in ("--set", s)], *flags]


def _the_run() -> FakeRun:
    assert len(FakeRun.built) == 1
    return FakeRun.built[0]


# ------------------------------------------------------------------------------ the parser
def test_the_parser_reads_every_flag():
    """--config, repeated --set (in order), the mode and the switches land where cli reads them;
    without flags every mode and switch is off."""
    p = make_parser("fake-train", "d", FakeConfig)
    a = p.parse_args(["--config", "c.yaml", "--set", "fake.steps=2", "--set", "run.output_dir=o",
                      "--auto-resume", "--no-progress", "--no-export"])
    assert (a.config, a.overrides) == ("c.yaml", ["fake.steps=2", "run.output_dir=o"])
    assert (a.resume, a.overwrite, a.auto_resume, a.no_progress, a.no_export) == (
        False, False, True, True, True)
    a = p.parse_args(["--config", "c.yaml"])
    assert (a.overrides, a.resume, a.overwrite, a.auto_resume, a.no_progress, a.no_export) == (
        [], False, False, False, False, False)


@pytest.mark.parametrize("pair", [("--resume", "--overwrite"), ("--resume", "--auto-resume"),
                                  ("--overwrite", "--auto-resume")])
def test_resume_overwrite_and_auto_resume_exclude_each_other(pair, capsys):
    """Any two of --resume, --overwrite, --auto-resume are refused by argparse (exit code 2)."""
    with pytest.raises(SystemExit) as stop:
        make_parser("fake-train", "d", FakeConfig).parse_args(["--config", "c.yaml", *pair])
    assert stop.value.code == 2
    assert f"argument {pair[1]}: not allowed with argument {pair[0]}" in capsys.readouterr().err


def test_config_is_required_and_help_lists_the_schema_keys(capsys):
    """No --config: exit code 2 naming it; --help's epilog has one line per key of the schema
    with its type, default and range."""
    p = make_parser("fake-train", "d", FakeConfig)
    with pytest.raises(SystemExit) as stop:
        p.parse_args([])
    assert stop.value.code == 2
    assert "the following arguments are required: --config" in capsys.readouterr().err
    text = p.format_help()
    assert re.search(r"^  fake\.steps +int += 3 +in \(0, inf\)$", text, re.M), text
    assert re.search(r"^  fake\.fail +str += '' +one of: , init, ", text, re.M), text
    assert re.search(r"^  run\.output_dir +str += 'runs/fake'$", text, re.M), text


# ------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("error, line", [
    (RunError("cannot resume out: it holds no run"), "error: cannot resume out: it holds no run"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/no/such/file"),
     "error: /no/such/file: no such file or directory"),
    (PermissionError(errno.EACCES, "Permission denied", "/etc/shadow"),
     "error: /etc/shadow: permission denied"),
    (OSError(errno.ENOSPC, "No space left on device"), "error: a file: no space left on device"),
], ids=["run-error", "no-such-file", "permission", "no-filename"])
def test_report_error_prints_one_line_and_returns_2(error, line, capsys):
    """A RunError prints its message; an OSError its path (or "a file") and cause in words."""
    assert report_error(error) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", line + "\n")


# ------------------------------------------------------------------------------- the driver
def test_a_run_prints_and_writes_its_summary_then_exports(tmp_path, capsys):
    """Exit code 0: the data line, the table, the export line and the headline last on stdout;
    summary.md holds the table and the headline; run, export and close called once each."""
    out = tmp_path / "run"
    assert _trainer().main(_argv(tmp_path)) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out == (f"data: 3 fake prompts\n{TABLE}\nexported fake model: {out / 'model'}"
                            f"\n{HEADLINE}\n")
    assert (out / "summary.md").read_text() == f"{TABLE}\n\n{HEADLINE}\n"
    assert sorted(p.name for p in out.iterdir()) == ["summary.md"]  # no temporary file left
    run = _the_run()
    assert [c for c in run.calls if c != "describe_data"] == ["run", "export", "close"]
    assert run.kwargs == dict(resume=False, overwrite=False, progress=False)
    assert run.cfg.fake.steps == 3 and run.cfg.run.output_dir == str(out)


@pytest.mark.parametrize("flags, kwargs", [
    ((), dict(resume=False, overwrite=False, progress=True)),
    (("--resume",), dict(resume=True, overwrite=False, progress=True)),
    (("--auto-resume",), dict(resume="auto", overwrite=False, progress=True)),
    (("--overwrite", "--no-progress"), dict(resume=False, overwrite=True, progress=False)),
])
def test_the_mode_reaches_the_run(flags, kwargs, tmp_path, capsys):
    """--resume is resume=True, --auto-resume resume="auto", --overwrite overwrite=True, and
    --no-progress progress=False, as the run is built."""
    assert _trainer().main(_argv(tmp_path, flags=(*flags, "--no-export"))) == 0
    assert _the_run().kwargs == kwargs


def test_no_export_skips_the_export_and_keeps_the_rest(tmp_path, capsys):
    """--no-export: export() is never called and no export line is printed; summary.md and the
    headline are as without it, and close() is called."""
    out = tmp_path / "run"
    assert _trainer().main(_argv(tmp_path, flags=("--no-progress", "--no-export"))) == 0
    assert capsys.readouterr().out == f"data: 3 fake prompts\n{TABLE}\n{HEADLINE}\n"
    assert (out / "summary.md").read_text() == f"{TABLE}\n\n{HEADLINE}\n"
    assert [c for c in _the_run().calls if c != "describe_data"] == ["run", "close"]


def test_without_a_headline_summary_md_is_the_table(tmp_path, capsys):
    """The default headline is none: summary.md is the table alone and stdout ends with the
    export line."""
    trainer = Trainer("fake-train", "d", FakeConfig, FakeRun, _table, "fake model")
    assert trainer.main(_argv(tmp_path)) == 0
    out = tmp_path / "run"
    assert (out / "summary.md").read_text() == TABLE + "\n"
    assert capsys.readouterr().out.endswith(f"{TABLE}\nexported fake model: {out / 'model'}\n")


def test_the_plot_is_drawn_in_the_run_directory_and_its_failure_is_one_line(tmp_path, capsys):
    """`plot(records, out)` is called with the records; an OSError from it is exit code 2 with
    one line naming the run directory, no export, and close() called."""
    out = tmp_path / "run"
    drawn = []
    assert _trainer(plot=lambda records, where: drawn.append((records, where))).main(
        _argv(tmp_path, flags=("--no-progress", "--no-export"))) == 0
    assert drawn == [([{"iteration": t, "loss": 1.0 / (t + 2)} for t in (-1, 0, 1, 2)], out)]
    capsys.readouterr()

    def refused(records, where):
        raise PermissionError(errno.EACCES, "Permission denied", str(where / "plot.png"))

    FakeRun.built.clear()
    assert _trainer(plot=refused).main(_argv(tmp_path, "run.output_dir=" + str(out))) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: cannot write {out}: permission denied\n"
    assert [c for c in _the_run().calls if c != "describe_data"] == ["run", "close"]


@pytest.mark.parametrize("fail, line", [
    ("run", "error: iteration 1: 3 optimizer steps in a row were skipped"),
    ("export", "error: not exporting {out}/model: the parameters hold NaN"),
], ids=["in-run", "in-export"])
def test_a_run_error_is_one_line_exit_2_and_the_run_is_closed(fail, line, tmp_path, capsys):
    """A RunError from run() (no summary.md) or from export() (summary.md already written):
    exit code 2, exactly one line on stderr, and close() called all the same."""
    out = tmp_path / "run"
    assert _trainer().main(_argv(tmp_path, f"fake.fail={fail}")) == 2
    assert capsys.readouterr().err == line.format(out=out) + "\n"
    assert _the_run().calls[-1] == "close" and _the_run().calls.count("close") == 1
    assert (out / "summary.md").exists() == (fail == "export")


@pytest.mark.parametrize("sets, line", [
    (["fake.stepz=2"], "error: unknown key 'fake.stepz'; did you mean 'fake.steps'?"),
    (["fake.steps=0"], "error: fake.steps=0 is out of range (0, inf)"),
    (["fake.fail=init"], "error: {out} already holds a run; resume it or overwrite it"),
], ids=["unknown-key", "out-of-range", "refused-start"])
def test_a_bad_config_or_a_refused_start_is_one_line_exit_2(sets, line, tmp_path, capsys):
    """A bad config key or value stops before any run is built; a RunError while the run is
    built stops with its line; exit code 2 and one line on stderr either way."""
    assert _trainer().main(_argv(tmp_path, *sets)) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", line.format(out=tmp_path / "run") + "\n")
    built = 0 if sets[0].startswith("fake.step") else 1
    assert len(FakeRun.built) == built and all(r.calls == [] for r in FakeRun.built)


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    """--config naming no file: exit code 2, one line naming it."""
    missing = tmp_path / "nope.yaml"
    assert _trainer().main(["--config", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: config file not found: {missing}\n"
    assert FakeRun.built == []


def test_write_summary_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    """summary.md is replaced whole; when the rename fails the old one stays untouched, and
    the error is one RunError naming summary.md and the cause."""
    write_summary(tmp_path, "old")
    assert (tmp_path / "summary.md").read_text() == "old\n"
    write_summary(tmp_path, "new table")
    assert (tmp_path / "summary.md").read_text() == "new table\n"

    def full(self, target):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "replace", full)
    with pytest.raises(RunError) as info:
        write_summary(tmp_path, "newer table")
    assert str(info.value) == f"cannot write {tmp_path / 'summary.md'}: no space left on device"
    assert (tmp_path / "summary.md").read_text() == "new table\n"
    monkeypatch.undo()
    with pytest.raises(RunError, match=r"^cannot write .*/missing/summary\.md: no such file"):
        write_summary(tmp_path / "missing", "x")


# ---------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("sets, code, where", [
    (["fake.fail=SIGTERM", "fake.done=2"], 143,
     "checkpoint 1 in {out} is the newest; --resume continues from iteration 2"),
    (["fake.fail=SIGTERM", "fake.done=0"], 143,
     "no iteration was complete, so there is no checkpoint; start again with --overwrite"),
    (["fake.fail=SIGINT", "fake.done=3"], 130,
     "all 3 iterations are checkpointed in {out}; --resume writes the summary and the export "
     "again"),
    (["fake.fail=init_signal"], 143, "before the run started; its directory is as it was"),
], ids=["mid-run", "nothing-done", "all-done", "while-built"])
def test_a_signal_stops_with_128_plus_its_number_and_says_where(sets, code, where, tmp_path,
                                                                 capsys):
    """SIGTERM or SIGINT during run() (or while the run is built): exit code 128 + the signal's
    number, one line "stopped by NAME: <where the run stands>", no summary or export, close()
    called on a built run, and the previous signal handlers back afterwards."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    out = tmp_path / "run"
    assert _trainer().main(_argv(tmp_path, *sets)) == code
    name = "SIGINT" if code == 130 else "SIGTERM"
    assert capsys.readouterr().err == f"stopped by {name}: {where.format(out=out)}\n"
    assert {s: signal.getsignal(s) for s in before} == before
    assert not (out / "summary.md").exists()
    run = _the_run()
    calls = [c for c in run.calls if c != "describe_data"]
    assert calls == ([] if "init_signal" in sets[0] else ["run", "close"])


@pytest.mark.parametrize("done, steps, unit, where", [
    (0, 4, "epoch", "no epoch was complete, so there is no checkpoint; start again with "
                    "--overwrite"),
    (1, 4, "epoch", "checkpoint 0 in out/rm is the newest; --resume continues from epoch 1"),
    (5, 4, "epoch", "all 4 epochs are checkpointed in out/rm; --resume writes the summary and "
                    "the export again"),
], ids=["nothing-done", "some-done", "all-done"])
def test_where_a_stopped_run_stands_in_its_own_unit(done, steps, unit, where):
    """_where names the run's own unit and treats next_step past the end as all checkpointed."""
    run = SimpleNamespace(unit=unit, next_step=done, steps=steps, out=Path("out/rm"))
    assert cli._where(run) == where

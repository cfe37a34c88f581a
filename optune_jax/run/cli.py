"""The trainers' shared command line: arguments, the run driver, one-line errors, summary.md."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from optune_jax.run.config_file import describe_options, load_config
from optune_jax.run.errors import RunError, describe_os_error, file_error

if TYPE_CHECKING:  # the runner imports JAX: only once a config is valid
    from optune_jax.run.runner import Runner


def make_parser(prog: str, description: str, schema: type) -> argparse.ArgumentParser:
    """The trainers' shared command line: --config, --set, --resume | --overwrite, switches."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="config keys (YAML sections; override any with --set section.key=value):\n"
        + describe_options(schema),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.learning_rate=1e-6 (repeatable)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in run.output_dir from its newest complete checkpoint",
    )
    mode.add_argument(
        "--overwrite", action="store_true", help="delete what run.output_dir holds and start afresh"
    )
    mode.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume if run.output_dir holds a checkpoint, else start a run there (job scripts "
        "that restart after preemption)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--no-export", action="store_true", help="skip the transformers export")
    return p


def report_error(error: Exception) -> int:
    """Prints `error` as the one line a user reads (a bare OSError with its path and cause);
    returns the exit code 2."""
    message = str(error)
    if isinstance(error, OSError):
        message = f"{error.filename or 'a file'}: {describe_os_error(error)}"
    print(f"error: {message}", file=sys.stderr)
    return 2


@dataclasses.dataclass(frozen=True)
class Trainer:
    """A trainer's command: its name and help line, config schema, the function that builds
    its run once the config is valid (`run(cfg, resume=, overwrite=, progress=)`, importing the
    heavy modules only then), summary table of the metrics records, and what its export is
    called."""

    prog: str
    description: str
    schema: type
    run: Callable[..., Runner]
    summary_table: Callable[[list[dict]], str]
    exported: str
    # what happened, in one line of words, printed last and closing summary.md ("": none)
    headline: Callable[[list[dict], Path], str] = lambda records, out: ""
    plot: Callable[[list[dict], Path], object] | None = None  # a picture of the run, in out

    def main(self, argv: list[str] | None = None) -> int:
        """The command: exit code 0, or 2 with one line on stderr (`run_main`)."""
        return run_main(argv, self)

    def make_run(self, cfg, **kw) -> Runner:
        return self.run(cfg, **kw)


def run_main(argv: list[str] | None, trainer: Trainer) -> int:
    """A trainer's `main`: parses `argv`, loads the config, builds the run, trains, writes and
    prints the summary, exports; returns the exit code (2: one line on stderr for what a user
    can fix; 128 + the signal's number after SIGINT or SIGTERM, with one line saying where a
    `--resume` continues). With several processes, process 0 speaks and writes."""
    args = make_parser(trainer.prog, trainer.description, trainer.schema).parse_args(argv)
    from optune_jax.run import signals

    started: dict = {}  # "run": the run once built, for the line after a signal
    with signals.stop_on_signals():
        try:
            return _run(args, trainer, started)
        except signals.Interrupted as stop:
            print(f"stopped by {stop.name}: {_where(started.get('run'))}", file=sys.stderr)
            return stop.exit_code


def _where(run) -> str:
    """Where a stopped run stands: which checkpoint is the newest, what --resume does."""
    if run is None:
        return "before the run started; its directory is as it was"
    unit, done = run.unit, run.next_step
    if done == 0:
        return (f"no {unit} was complete, so there is no checkpoint; start again with "
                "--overwrite")
    if done >= run.steps:
        return (f"all {run.steps} {unit}s are checkpointed in {run.out}; --resume writes the "
                "summary and the export again")
    return (f"checkpoint {done - 1} in {run.out} is the newest; --resume continues from "
            f"{unit} {done}")


def _quiet_libraries() -> None:
    """orbax and JAX log through absl: their warnings (a checkpoint file we already diagnose,
    say) would come before our one line; errors still show."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)


def _run(args, trainer: Trainer, started: dict) -> int:
    schema, make_run = trainer.schema, trainer.make_run
    summary_table, exported = trainer.summary_table, trainer.exported
    try:
        cfg = load_config(args.config, args.overrides, schema=schema)
        from optune_jax.run import (
            compile_cache,  # heavy imports once the config is valid
            distributed,
        )

        _quiet_libraries()
        d = getattr(cfg, "distributed", None)
        if d is not None:
            distributed.initialize(d.coordinator, d.num_processes, d.process_id)
        compile_cache.enable(cfg.run.compilation_cache)  # before anything compiles
        resume = "auto" if args.auto_resume else args.resume
        run = make_run(cfg, resume=resume, overwrite=args.overwrite, progress=not args.no_progress)
        started["run"] = run
    except (ValueError, OSError) as e:  # RunError (config, data, output directory) among them
        return report_error(e)
    try:
        primary = distributed.is_primary()
        described = run.describe_data() if primary else ""
        if described:
            print(described)
        records = run.run()
        headline = ""
        if primary:
            table = summary_table(records)
            headline = trainer.headline(records, run.out)
            write_summary(run.out, table + (f"\n\n{headline}" if headline else ""))
            print(table)
            if trainer.plot is not None:
                try:
                    trainer.plot(records, run.out)
                except OSError as e:
                    raise file_error("write", run.out, e) from None
        if not args.no_export:
            out = run.export()  # every process joins; process 0 writes
            if primary:
                print(f"exported {exported}: {out}")
        if headline:
            print(headline)
    except (RunError, OSError) as e:  # what a user can fix: one line, exit code 2
        return report_error(e)
    finally:
        run.close()
    return 0


def write_summary(out: Path, table: str) -> None:
    """`out/summary.md`, written whole or not at all (RunError naming the file and cause)."""
    path = out / "summary.md"
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(table + "\n")
        tmp.replace(path)
    except OSError as e:
        raise file_error("write", path, e) from None

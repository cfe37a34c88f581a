"""Atomic, verified, resumable checkpoints of a run with orbax (one step per completed iteration).

orbax writes each step into a temporary directory and renames it when complete, and lists
only finalized steps, so a run killed mid-save resumes from the newest complete iteration.
After orbax finishes, we add `FILES` to the step: every file's size, so a later truncation or a
lost file is found before a restore (orbax would fail with a long traceback, or not at all
when only its metadata is gone). `restore_newest` verifies steps newest first, moves damaged
ones aside (`<directory>.damaged/<step>`, nothing is deleted) and restores the newest good one.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import gc
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from optune_jax.run.errors import RunError, describe_os_error, file_error, one_line

FILES = "optune_files.json"  # {relative path: size in bytes} of a complete step
ITEMS = ("state", "host", "meta")  # the Composite's items, one directory each
SETTLE_TIMEOUT_S = 60.0  # how long a failed save or restore waits for orbax's threads
SETTLE_CALLBACKS_S = 1.0  # and then for tensorstore's callbacks of the failed writes


@dataclasses.dataclass
class Restored:
    """What `restore_newest` found: the step restored (None: no good one) and its contents,
    the damaged steps skipped with the reason, and a one-line note about them ("" if none)."""

    step: int | None
    state: Any = None
    host: Any = None
    meta: dict | None = None
    damaged: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    note: str = ""


TRACEBACK = "Traceback (most recent call last):"
CLOSED_LOOP = "RuntimeError: Event loop is closed"


class _DropClosedLoop:
    """sys.stderr without the tracebacks of tensorstore callbacks that outlive a failed orbax
    write and find its event loop closed (one per pending array, printed from other threads
    whenever they fire, up to the process's exit); every other line passes unchanged."""

    def __init__(self, stream):
        self.stream, self.pending, self.block = stream, "", None

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self._line(line + "\n")
        if self.block is None and self.pending and not TRACEBACK.startswith(self.pending[:34]):
            self.stream.write(self.pending)  # a partial line (a progress bar): now
            self.pending = ""
        return len(text)

    def _line(self, line: str) -> None:
        if self.block is not None:
            if line[:1].isspace():
                self.block.append(line)
                return
            block, self.block = self.block, None
            if line.strip() != CLOSED_LOOP:
                self.stream.write("".join(block) + line)
        elif line.startswith(TRACEBACK):
            self.block = [line]
        else:
            self.stream.write(line)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding, ... of the wrapped stream
        return getattr(self.stream, name)


@contextlib.contextmanager
def _orbax_quiet():
    """orbax's own reports of a failing write stay unprinted (its threads' absl ERROR lines with
    tracebacks, and the closed-loop callbacks, which go on after the failure): it is reported
    once, in our one line."""
    absl = logging.getLogger("absl")
    level, stderr = absl.level, sys.stderr
    absl.setLevel(logging.CRITICAL)
    if not isinstance(stderr, _DropClosedLoop):
        sys.stderr = _DropClosedLoop(stderr)
    try:
        yield
    except Exception:
        time.sleep(SETTLE_CALLBACKS_S)  # most callbacks fire now, into the filter, which stays
        atexit.register(_close_stderr)  # and those still pending at exit find no stderr
        raise
    else:
        sys.stderr = stderr
    finally:
        absl.setLevel(level)


def _close_stderr() -> None:
    """At exit after a failed write, once our one line is out: file descriptor 2 to /dev/null,
    for the callbacks that fire while the interpreter shuts down (past sys.stderr)."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC, or tensorstore's RESOURCE_EXHAUSTED for it (a ValueError naming os_error_code 28)."""
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    text = str(error)
    return "No space left on device" in text or "RESOURCE_EXHAUSTED" in text


@contextlib.contextmanager
def _settled_on_failure():
    """When the body raises: waits for the threads orbax started meanwhile (after one item
    fails they go on writing or reading the others) and collects their leftovers, unfinished
    coroutines that would each print a traceback ("Exception ignored in ...") when collected."""
    started = set(threading.enumerate())
    try:
        yield
    except Exception:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        hook, sys.unraisablehook = sys.unraisablehook, lambda _: None
        try:
            for thread in set(threading.enumerate()) - started:
                while time.monotonic() < deadline:
                    try:
                        thread.join(timeout=max(0.0, deadline - time.monotonic()))
                        break
                    except RuntimeError:  # listed, but not yet started
                        time.sleep(0.01)
            gc.collect()
        finally:
            sys.unraisablehook = hook
        raise


class Checkpoints:
    """Saves and restores {"state": device pytree, "host": NumPy pytree, "meta": JSON}.

    File system failures are RunErrors naming the path and the cause.
    """

    def __init__(self, directory: str | Path, *, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,  # a save cut short leaves a temporary directory
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise file_error("create", self.directory, e, creating=True) from None

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, *, state: Any, host: Any, meta: dict) -> None:
        path = self.directory / str(step)
        try:
            with _orbax_quiet(), _settled_on_failure():  # nothing writes into the step after
                self._manager.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state),
                        host=ocp.args.StandardSave(host),
                        meta=ocp.args.JsonSave(meta),
                    ),
                )
                self._manager.wait_until_finished()
            if jax.process_index() == 0:
                sizes = {
                    str(f.relative_to(path)): f.stat().st_size
                    for f in sorted(path.rglob("*"))
                    if f.is_file()
                }
                tmp = path / (FILES + ".tmp")
                tmp.write_text(json.dumps(sizes, indent=0))
                tmp.replace(path / FILES)
        except Exception as e:  # orbax and tensorstore raise OSError, ValueError and others
            self._remove_partial(step)
            if _is_disk_full(e):
                cause = "no space left on device"
            else:
                cause = describe_os_error(e) if isinstance(e, OSError) else one_line(e)
            raise RunError(f"cannot write checkpoint {path}: {cause}") from e

    def _remove_partial(self, step: int) -> None:
        """Deletes what a failed save of `step` left: orbax's temporary directory, or the step
        itself when its file list was never written (it would be skipped as damaged anyway)."""
        if jax.process_index() != 0:
            return
        for left in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(left, ignore_errors=True)
        final = self.directory / str(step)
        if final.is_dir() and not (final / FILES).exists():
            shutil.rmtree(final, ignore_errors=True)
        with contextlib.suppress(Exception):
            self._manager.reload()

    def problem(self, step: int) -> str | None:
        """Why step `step` is incomplete (None: every file is there at its saved size)."""
        path = self.directory / str(step)
        listing = path / FILES
        if not listing.exists():  # saved by an older version, or killed just before the list
            need = [*ITEMS, "state/_METADATA", "host/_METADATA"]
            missing = [name for name in need if not (path / name).exists()]
            return f"{missing[0]} is missing" if missing else None
        try:
            sizes = json.loads(listing.read_text())
        except (OSError, ValueError) as e:
            return f"its file list {FILES} is unreadable ({one_line(e)})"
        for name, size in sizes.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} of its {size} bytes"
        return None

    def restore(self, step: int, *, state_like: Any, host_like: Any) -> tuple[Any, Any, dict]:
        """Restores into the structure, shapes and shardings of the `*_like` pytrees."""
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract(state_like)),
                host=ocp.args.StandardRestore(abstract(host_like)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], out["host"], out["meta"]

    def restore_newest(self, *, state_like: Any, host_like: Any) -> Restored:
        """The newest step that is complete (`problem`) and reads back, restored like `restore`.

        Damaged steps met on the way are moved to `<directory>.damaged/` (so the run can save
        those steps again) and named, with the reason, in `Restored.note`.
        """
        damaged = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            why = self.problem(step)
            if why is None:
                try:
                    with _settled_on_failure():
                        state, host, meta = self.restore(
                            step, state_like=state_like, host_like=host_like
                        )
                except Exception as e:  # a damaged array: tensorstore's error, many lines
                    why = f"it cannot be read ({one_line(e, 100)})"
                else:
                    return Restored(step, state, host, meta, damaged, self._note(damaged, step))
            damaged.append((step, why))
            self._set_aside(step)
        return Restored(None, damaged=damaged, note=self._note(damaged, None))

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            aside = self.directory.with_name(self.directory.name + ".damaged")
            target, n = aside / str(step), 1
            while target.exists():  # damaged again after an earlier resume
                target, n = aside / f"{step}.{n}", n + 1
            try:
                aside.mkdir(exist_ok=True)
                (self.directory / str(step)).rename(target)
            except OSError as e:
                raise file_error("move aside the damaged checkpoint", target, e) from None
        self._manager.reload()

    def _note(self, damaged: list[tuple[int, str]], step: int | None) -> str:
        if not damaged:
            return ""
        aside = self.directory.name + ".damaged"
        bad = "; ".join(f"checkpoint {s} is damaged: {why}" for s, why in damaged)
        then = f"resuming from checkpoint {step}" if step is not None else "starting afresh"
        return f"{bad} (moved to {aside}/); {then}"

    def meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def close(self) -> None:
        self._manager.close()

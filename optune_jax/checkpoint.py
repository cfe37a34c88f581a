"""Atomic, verified, resumable checkpoints of a run with orbax (one step per completed iteration).

orbax writes each step into a temporary directory and renames it when complete, and lists
only finalized steps, so a run killed mid-save resumes from the newest complete iteration.
After orbax finishes, we add `FILES` to the step: every file's size, so a later truncation or a
lost file is found before a restore (orbax would fail with a long traceback, or not at all
when only its metadata is gone). `restore_newest` verifies steps newest first, moves damaged
ones aside (`<directory>.damaged/<step>`, nothing is deleted) and restores the newest good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from optune_jax.errors import RunError, describe_os_error, file_error, one_line

FILES = "optune_files.json"  # {relative path: size in bytes} of a complete step
ITEMS = ("state", "host", "meta")  # the Composite's items, one directory each
SETTLE_TIMEOUT_S = 60.0  # how long a failed save or restore waits for orbax's threads


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
            with _settled_on_failure():  # nothing writes into the step once we return
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
            cause = describe_os_error(e) if isinstance(e, OSError) else one_line(e)
            raise RunError(f"cannot write checkpoint {path}: {cause}") from e

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

"""A run's output directory: one run at a time (`RunLock`), refuse to clobber another run,
resume only a compatible one."""

from __future__ import annotations

import datetime
import fcntl
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from optune_jax.run.errors import RunError, file_error, one_line

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"  # held by the live run (flock); the kernel releases it when the process dies


class RunLock:
    """An exclusive lock on `out/.lock` for the life of a run: a second run, `--overwrite` or
    `--resume` on the same directory while the first is alive is refused in one line naming
    its process. flock is released by the kernel when the holder dies, however it dies, so a
    lock file left by a dead run never blocks (its stale contents are rewritten)."""

    def __init__(self, out: Path, *, resume: bool | str = False):
        self.path = Path(out) / LOCK_FILE
        _check_target(out, resume)  # before anything is created
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise file_error("use the output directory", out, e, creating=True) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunError(
                f"{out} is in use by another run ({holder}); wait for it to end or choose "
                "another run.output_dir"
            ) from None
        self._fd = fd
        since = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since {since}".encode(), 0)

    def release(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    __del__ = release  # a run object dropped without `close` (a failed start) lets go too


def _check_target(out: Path, resume: bool | str) -> None:
    if out.exists() and not out.is_dir():  # never deleted, not even to overwrite
        raise RunError(f"cannot use the output directory {out}: it is a file")
    if resume is True and not (out / CONFIG_FILE).exists():
        raise RunError(
            f"cannot resume {out}: it holds no run (no {CONFIG_FILE}); check the path, or start "
            "a new run there without --resume"
        )


def _clear(out: Path) -> None:
    """Deletes what `out` holds except the lock file (held by this run)."""
    for entry in out.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        name = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += diff_keys(a[k], b[k], name + ".")
        elif a.get(k) != b.get(k):
            keys.append(name)
    return keys


def replace_dir(target: Path, write: Callable[[Path], object]) -> Path:
    """`write(partial)` into a sibling `<target>.partial`, renamed to `target` when complete (an
    earlier `target` is replaced): a failure leaves no half-written `target`. File system
    errors are RunErrors naming `target` and the cause."""
    partial = target.with_name(target.name + ".partial")
    try:
        shutil.rmtree(partial, ignore_errors=True)
        write(partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise file_error("write", target, e, creating=True) from None
    return target


def prepare_run_dir(
    out: Path, resolved: dict, *, resume: bool, overwrite: bool, resumable: Sequence[str] = ()
) -> None:
    """Makes `out` ready and writes the resolved config to `out/config.yaml` (atomically).

    A directory holding a run is refused unless `overwrite` (deleted) or `resume` (its stored
    config may differ from `resolved` only in the `resumable` keys or sections); any other
    non-empty directory is refused unless `overwrite`. `resume=True` refuses a directory that
    holds no run; `resume="auto"` starts one there. Raises RunError (one line), also for any
    file system error (a file on the way, permissions, no space).
    """
    try:
        _prepare(out, resolved, resume=resume, overwrite=overwrite, resumable=resumable)
    except OSError as e:
        raise file_error("use the output directory", out, e, creating=True) from None


def _prepare(out: Path, resolved: dict, *, resume, overwrite, resumable) -> None:
    _check_target(out, resume)
    stored = out / CONFIG_FILE
    if stored.exists():
        if overwrite:
            _clear(out)
        elif resume:
            try:
                old = yaml.safe_load(stored.read_text())
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise RunError(f"cannot resume {out}: {stored} is damaged: {one_line(e)}") from None
            if not isinstance(old, dict):
                raise RunError(f"cannot resume {out}: {stored} holds no config")
            diff = [
                k
                for k in diff_keys(old, resolved)
                if not any(k == p or k.startswith(p + ".") for p in resumable)
            ]
            if diff:
                raise RunError(
                    f"cannot resume {out}: its checkpoint was made with a different config "
                    f"({', '.join(diff)}); choose another output directory or overwrite it"
                )
        else:
            raise RunError(f"{out} already holds a run; resume it or overwrite it")
    elif out.exists() and any(e.name != LOCK_FILE for e in out.iterdir()) and not overwrite:
        raise RunError(
            f"{out} exists and is not an optune-jax run directory; "
            "choose another run.output_dir or overwrite it"
        )
    out.mkdir(parents=True, exist_ok=True)
    tmp = stored.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
    tmp.replace(stored)

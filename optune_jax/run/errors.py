"""The error a run stops with when the user can fix the cause, and file system failures in words.

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise file_error("create the output directory", path, e, creating=True) from None

Every message is one line that names the path and the cause ("not a directory", "permission
denied", "no space left on device") and no command-line flag, as it serves Python callers too.
ConfigError, DataError and RewardError are RunErrors: the CLIs print any of them as one line
and exit with code 2.
"""

from __future__ import annotations

import errno
from pathlib import Path

# errno -> the cause in a few words (the C library's wording, lower-cased, where it is clear)
_CAUSES = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EISDIR: "it is a directory, not a file",
    errno.ENAMETOOLONG: "file name too long",
    errno.EEXIST: "it already exists",
}


class RunError(ValueError):
    """A run that cannot start, resume or go on as asked; the message is one line."""


class ConfigError(RunError):
    """A configuration that cannot be loaded; the message is one line naming the bad value."""


def one_line(error: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, cut to `limit` characters (a library's error, for
    a one-line message); the cause when `error` wraps one (datasets' generation errors do)."""
    error = error.__cause__ or error
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _first_file_on_the_way(path: Path) -> Path | None:
    """The first component of `path`, from the root down, that exists but is no directory."""
    for p in (*reversed(path.parents), path):
        try:
            if p.exists() and not p.is_dir():
                return p
        except OSError:
            return None
    return None


def describe_os_error(error: OSError, path: str | Path | None = None, *, creating=False) -> str:
    """Why `error` happened to `path` (default: the error's own file name), in a few words.

    `creating`: the operation made `path` (a directory or file), so "no such file or directory"
    with an existing parent means the file system there refuses new entries (/proc, /sys).
    """
    path = Path(path if path is not None else error.filename or ".")
    if error.errno in _CAUSES:
        return _CAUSES[error.errno]
    if error.errno == errno.ENOTDIR:
        blocker = _first_file_on_the_way(path)
        return f"{blocker} is a file, not a directory" if blocker else "not a directory"
    if error.errno == errno.ENOENT:
        parent = path.parent
        if creating and parent.is_dir() and not path.exists():
            return f"the file system at {parent} refuses new entries (no such file or directory)"
        return "no such file or directory"
    return (error.strerror or type(error).__name__).lower()


def file_error(action: str, path: str | Path, error: OSError, *, creating=False) -> RunError:
    """RunError "cannot {action} {path}: {cause}" for an OSError met while doing `action`."""
    cause = describe_os_error(error, error.filename or path, creating=creating)
    return RunError(f"cannot {action} {path}: {cause}")

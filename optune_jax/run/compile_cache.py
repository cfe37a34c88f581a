"""JAX's persistent compilation cache, set up once by the command lines before anything compiles.

A second run of the same shapes then loads its programs from disk instead of recompiling them.
Where the cache lives, highest priority first:

- `OPTUNE_JAX_CACHE`: a directory, or "off" (the environment wins over the config: the tests set
  it to "off", so a suite never reads or writes a user's cache);
- the config's `run.compilation_cache`: "auto", a directory, or null / "off";
- "auto": `$XDG_CACHE_HOME/optune_jax/jax`, else `~/.cache/optune_jax/jax`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from pathlib import Path

from optune_jax.run.errors import RunError, file_error

ENV = "OPTUNE_JAX_CACHE"
OFF = "off"
AUTO = "auto"


def default_dir(env: Mapping[str, str] | None = None) -> Path:
    """The "auto" cache: under $XDG_CACHE_HOME (when set to an absolute path, per the XDG base
    directory spec), else ~/.cache."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "optune_jax" / "jax"


def resolve(setting: str | None, env: Mapping[str, str] | None = None) -> Path | None:
    """The cache directory for the config's `setting` ("auto", a path, None) under `env`
    (default os.environ; a non-empty OPTUNE_JAX_CACHE wins): an absolute Path, or None for off.
    RunError (one line) for an empty setting."""
    env = os.environ if env is None else env
    value, where = env.get(ENV, ""), ENV
    if not value:
        value, where = setting, "run.compilation_cache"
    if value is None or value.strip().lower() == OFF:
        return None
    value = value.strip()
    if not value:
        raise RunError(f"{where}: empty; give {AUTO!r}, a directory, or {OFF!r}")
    if value.lower() == AUTO:
        return default_dir(env)
    return Path(value).expanduser().absolute()


def enable(setting: str | None, env: Mapping[str, str] | None = None) -> Path | None:
    """Points JAX's persistent compilation cache at `resolve(setting, env)`, creating the
    directory, or turns the cache off; call before the first compile. Every program is cached,
    however small or quick to compile (a CPU run is made of many such programs). Returns the
    directory or None. RunError (one line) when the directory cannot be created or written."""
    import jax

    path = resolve(setting, env)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        if path.exists() and not path.is_dir():  # mkdir would say "it already exists"
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "permission denied", str(path))
    except OSError as e:
        error = file_error("use the compilation cache", path, e, creating=True)
        raise RunError(f"{error} (or set {ENV}=off)") from None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path

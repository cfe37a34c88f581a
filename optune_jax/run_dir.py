"""A run's output directory: refuse to clobber another run, resume only a compatible one."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import yaml

CONFIG_FILE = "config.yaml"


class RunError(ValueError):
    """A run that cannot start or resume as asked (one line for the CLI)."""


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


def prepare_run_dir(
    out: Path, resolved: dict, *, resume: bool, overwrite: bool, resumable: Sequence[str] = ()
) -> None:
    """Makes `out` ready and writes the resolved config to `out/config.yaml` (atomically).

    A directory holding a run is refused unless `overwrite` (deleted) or `resume` (its stored
    config may differ from `resolved` only in the `resumable` keys or sections); any other
    non-empty directory is refused unless `overwrite`.
    """
    stored = out / CONFIG_FILE
    if stored.exists():
        if overwrite:
            shutil.rmtree(out)
        elif resume:
            old = yaml.safe_load(stored.read_text())
            diff = [
                k
                for k in diff_keys(old, resolved)
                if not any(k == p or k.startswith(p + ".") for p in resumable)
            ]
            if diff:
                raise RunError(
                    f"cannot resume {out}: its checkpoint was made with a different config "
                    f"({', '.join(diff)}); use --overwrite"
                )
        else:
            raise RunError(
                f"{out} already holds a run; pass --resume to continue it "
                "or --overwrite to replace it"
            )
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise RunError(
            f"{out} exists and is not an optune-jax run directory; "
            "choose another run.output_dir or pass --overwrite"
        )
    out.mkdir(parents=True, exist_ok=True)
    tmp = stored.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
    tmp.replace(stored)

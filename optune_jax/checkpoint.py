"""Atomic, resumable checkpoints of a run with orbax (one step per completed iteration).

orbax writes each step into a temporary directory and renames it when complete, and lists
only finalized steps, so a run killed mid-save resumes from the newest complete iteration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """Saves and restores {"state": device pytree, "host": NumPy pytree, "meta": JSON}."""

    def __init__(self, directory: str | Path, *, keep: int = 2):
        self._manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False
            ),
        )

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, *, state: Any, host: Any, meta: dict) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                host=ocp.args.StandardSave(host),
                meta=ocp.args.JsonSave(meta),
            ),
        )
        self._manager.wait_until_finished()

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

    def meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def close(self) -> None:
        self._manager.close()

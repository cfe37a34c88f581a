"""Several processes (hosts) as one program: start-up, host <-> global array transfers, barriers.

Every process runs the same loop on the same host data (prompts, pool, pairs: small and
deterministic). Device data is global: `put` makes each process hand over only the rows its own
devices hold (`jax.make_array_from_process_local_data`), `get` gathers results back to every
host. With one process both are plain `device_put` / `device_get`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None):
    """Joins the processes of a run (call before anything touches a device).

    `coordinator`: None for a single process; "auto" lets `jax.distributed.initialize` read the
    cluster (Cloud TPU, SLURM, Open MPI, Kubernetes, JAX_COORDINATOR_ADDRESS); "host:port" with
    `num_processes` and `process_id` (each None: detected too). On the CPU the processes talk
    through gloo, jax's default CPU collectives.
    """
    if coordinator is None or jax.distributed.is_initialized():  # (a sweep's later runs)
        return
    if coordinator == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator, num_processes, process_id)


def is_primary() -> bool:
    """The process that writes files shared by the run (logs, exports, run config)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def put(tree, shardings):
    """Global arrays from host arrays every process holds in full, laid out by `shardings`
    (a tree or a prefix, e.g. one NamedSharding for a whole batch dict)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    shardings = jax.tree.broadcast(shardings, tree)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x), np.shape(x)),
        tree,
        shardings,
    )


def get(tree):
    """Host (NumPy) copies of global arrays, the whole array on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)

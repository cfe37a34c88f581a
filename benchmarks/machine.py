"""What the benchmarks ran on: a machine block and the measured float32 matmul throughput.

Shared by `forward.py` and `sampler_speed.py`; run it alone to print the block:
`python benchmarks/machine.py [--matmul-size 2048] [--repeats 10]`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from importlib import metadata

import jax
import jax.numpy as jnp


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def limit_cores(n: int | None) -> int:
    """Pins this process to its first `n` usable cores (all when None); returns the count.

    Call before JAX's first computation: XLA sizes its CPU thread pool from the affinity mask
    when the backend starts. Torch gets the same number of threads from the caller.
    """
    cores = sorted(os.sched_getaffinity(0))
    if n is not None and 0 < n < len(cores):
        os.sched_setaffinity(0, cores[:n])
    return usable_cores()


def matmul_gflops(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """Best-of-`repeats` GFLOP/s of a jitted [n, n] @ [n, n] in JAX (2 n^3 flops).

    Operands in `dtype`, the product accumulated in float32 (as `models` multiplies).
    """
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    matmul(a, b).block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def describe(gflops: float | None = None, matmul_size: int = 2048, dtype: str = "float32") -> str:
    """A markdown block naming the machine, the library versions and the JAX devices."""
    lines = [
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- platform: {platform.platform()}, python {platform.python_version()}",
        f"- cpu: {_cpu_model()}, {usable_cores()} usable cores (os.cpu_count()={os.cpu_count()}), "
        f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1 / 5 / 15 min), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        f"- jax {jax.__version__} (backend {jax.default_backend()}, devices {jax.devices()}), "
        f"flax {_version('flax')}, torch {_version('torch')}, "
        f"transformers {_version('transformers')}",
    ]
    if gflops is not None:
        lines.append(f"- measured {dtype} matmul ({matmul_size}x{matmul_size}, JAX, float32 "
                     f"accumulation, best of several): {gflops:.1f} GFLOP/s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(describe(matmul_gflops(args.matmul_size, args.repeats), args.matmul_size))


if __name__ == "__main__":
    main()

"""Host cost of one OPTune selection step at the paper's scale (design §7: 48k prompts, 512 tokens).

Times ranking + selecting, update_pool and build_pairs for each rho and prints a table.
Usage: python benchmarks/selection_speed.py [--prompts 48000] [--max-len 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from optune_jax import selection


def _generated_pool(num_prompts: int, max_len: int, rng: np.random.Generator):
    tokens_P2Y = rng.integers(0, 32_000, (num_prompts, 2, max_len), dtype=np.int32)
    lengths_P2 = rng.integers(1, max_len + 1, (num_prompts, 2), dtype=np.int32)
    rewards_P2 = rng.normal(size=(num_prompts, 2)).astype(np.float32)
    iteration_P = np.zeros(num_prompts, np.int32)
    return selection.PromptPool(tokens_P2Y, lengths_P2, rewards_P2, iteration_P)


def _median_ms(fn, *args, repeats: int, **kwargs) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), out


def _time_step(pool, rho: float, rng: np.random.Generator, repeats: int) -> tuple[int, list]:
    """(N, [select ms, update ms, pairs ms]) for one iteration at ratio rho."""
    sel_ms, idx_N = _median_ms(
        selection.select, pool, rho, rng=np.random.default_rng(1), repeats=repeats
    )
    n = idx_N.shape[0]
    tokens_N2Y = rng.integers(0, 32_000, (n, 2, pool.max_len), dtype=np.int32)
    lengths_N2 = rng.integers(1, pool.max_len + 1, (n, 2), dtype=np.int32)
    rewards_N2 = rng.normal(size=(n, 2)).astype(np.float32)
    upd_ms, new_pool = _median_ms(
        selection.update_pool, pool, idx_N, tokens_N2Y, lengths_N2, rewards_N2, 1, repeats=repeats
    )
    pair_ms, _ = _median_ms(selection.build_pairs, new_pool, 1, repeats=repeats)
    return n, [sel_ms, upd_ms, pair_ms]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48_000)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    pool = _generated_pool(args.prompts, args.max_len, rng)
    print(
        f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
        f"cpus={os.cpu_count()} | numpy {np.__version__} | python {platform.python_version()}"
    )
    print(f"pool: {args.prompts} prompts x 2 responses x {args.max_len} tokens (int32)")
    print(
        f"{'rho':>5} {'N':>7} {'select ms':>10} {'update ms':>10} {'pairs ms':>9} {'total ms':>9}"
    )
    for rho in (0.3, 0.5, 0.7, 1.0):
        n, ms = _time_step(pool, rho, rng, args.repeats)
        cells = " ".join(
            f"{m:>{w}.2f}" for m, w in zip([*ms, sum(ms)], (10, 10, 9, 9), strict=True)
        )
        print(f"{rho:>5} {n:>7} {cells}")


if __name__ == "__main__":
    main()

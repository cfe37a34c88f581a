"""Full-sequence forward tokens/s: our jitted Flax forward vs transformers' PyTorch model.

Same CPU, same SmolLM2-135M-Instruct weights (the GGUF dequantized to float32 by each side's
reader), same random token batch, float32 logits for every position on both sides. Torch runs
under `inference_mode` with as many threads as the cores XLA uses. Compile / first-call time
is reported apart; throughput is B*T / (best or median of `--repeats` timed calls).

Usage: python benchmarks/forward.py [--shapes 1x128 8x128] [--repeats 10]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import numpy as np
import torch

import machine
from models import forward
from models.gguf_io import find_smollm2_gguf, load_gguf


def _shape(text: str) -> tuple[int, int]:
    batch, length = text.lower().split("x")
    return int(batch), int(length)


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(first-call seconds, seconds of each of the next `repeats` calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, times


def _load_torch_model(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=_shape, default=[(1, 128), (8, 128)],
                        metavar="BxT", help="batch x length, e.g. 1x128 8x128")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    threads = machine.usable_cores()
    torch.set_num_threads(threads)  # XLA's CPU client already uses every usable core
    gflops = machine.matmul_gflops()
    path = find_smollm2_gguf()
    config, params = load_gguf(path)
    ours = jax.jit(functools.partial(forward, config=config))
    theirs = _load_torch_model(path)

    rows = []
    rng = np.random.default_rng(0)
    for b, t in args.shapes:
        tokens_BT = rng.integers(0, config.vocab_size, (b, t), dtype=np.int32)
        mask_BT = np.ones((b, t), np.int32)
        tokens_jax, mask_jax = jax.device_put(tokens_BT), jax.device_put(mask_BT)
        tokens_pt = torch.from_numpy(tokens_BT.astype(np.int64))
        mask_pt = torch.from_numpy(mask_BT.astype(np.int64))

        def run_ours():
            ours(params, tokens_jax, mask_jax).block_until_ready()

        @torch.inference_mode()
        def run_theirs():
            theirs(input_ids=tokens_pt, attention_mask=mask_pt, use_cache=False).logits

        first_ours, times_ours = _timed(run_ours, args.repeats)
        first_theirs, times_theirs = _timed(run_theirs, args.repeats)
        rows.append((b, t, first_ours, times_ours, first_theirs, times_theirs))

    print(f"## forward, float32, {threads} threads each, {args.repeats} timed calls "
          "after one warm-up call\n")
    print(machine.describe(gflops) + "\n")
    print("| batch x len | ours tok/s best (median) | transformers tok/s best (median) "
          "| ours / transformers (best) | ours first call s | transformers first call s |")
    print("|---|---|---|---|---|---|")
    for b, t, first_ours, times_ours, first_theirs, times_theirs in rows:
        n = b * t
        ours_best, ours_med = n / min(times_ours), n / statistics.median(times_ours)
        theirs_best, theirs_med = n / min(times_theirs), n / statistics.median(times_theirs)
        print(f"| {b} x {t} | {ours_best:,.0f} ({ours_med:,.0f}) "
              f"| {theirs_best:,.0f} ({theirs_med:,.0f}) | {ours_best / theirs_best:.2f} "
              f"| {first_ours:.2f} | {first_theirs:.2f} |")


if __name__ == "__main__":
    main()

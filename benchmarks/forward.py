"""Full-sequence forward tokens/s: our jitted Flax forward vs transformers' PyTorch model.

Same CPU, same SmolLM2-135M-Instruct weights (the GGUF dequantized to float32 by each side's
reader), same random token batch, float32 logits for every position on both sides (their max
difference is printed as a check). Torch runs under `inference_mode` with as many threads as
XLA's pool has. The first call (our compile) is reported apart; throughput is B*T / (best or
median of `--repeats` timed calls), the two sides alternating so both see the same load.

Usage: python benchmarks/forward.py [--shapes 1x128 8x128] [--repeats 10] [--threads N]
"""
# ruff: noqa: E402

from __future__ import annotations

import os

# libgomp reads this once, when torch loads it. Spinning OpenMP workers stall torch 10x or
# more on a CPU shared with other jobs (see README); export OMP_WAIT_POLICY=ACTIVE to undo.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import functools
import statistics
import time

import jax
import machine
import numpy as np
import torch

from models import forward
from models.gguf_io import find_smollm2_gguf, load_gguf


def _shape(text: str) -> tuple[int, int]:
    batch, length = text.lower().split("x")
    return int(batch), int(length)


def alternate(fn_a, fn_b, repeats: int) -> tuple[list[float], list[float], list, list]:
    """(seconds, outputs) of a first call and `repeats` more of each, alternating a, b, a, b."""
    times, outs = ([], []), ([], [])
    for _ in range(repeats + 1):
        for fn, seconds, out in zip((fn_a, fn_b), times, outs, strict=True):
            start = time.perf_counter()
            out.append(fn())
            seconds.append(time.perf_counter() - start)
    return *times, *outs


def load_torch_model(path):
    """transformers' own GGUF reader: the same file dequantized to a float32 PyTorch model."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    return model.eval()


def _run_ours(fn, params, tokens_BT, mask_BT):
    return np.asarray(fn(params, tokens_BT, mask_BT))


@torch.inference_mode()
def _run_theirs(model, tokens_BT, mask_BT):
    return model(input_ids=tokens_BT, attention_mask=mask_BT, use_cache=False).logits.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=_shape, default=[(1, 128), (8, 128)],
                        metavar="BxT", help="batch x length, e.g. 1x128 8x128")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="default: every usable core")
    args = parser.parse_args()

    threads = machine.limit_cores(args.threads)  # before XLA starts its thread pool
    torch.set_num_threads(threads)
    gflops = machine.matmul_gflops()
    path = find_smollm2_gguf()
    config, params = load_gguf(path)
    params = jax.device_put(params)  # NumPy leaves would be copied into XLA on every call
    ours = jax.jit(functools.partial(forward, config=config))
    theirs = load_torch_model(path)

    rows = []
    rng = np.random.default_rng(0)
    for b, t in args.shapes:
        tokens_BT = rng.integers(0, config.vocab_size, (b, t), dtype=np.int32)
        mask_BT = np.ones((b, t), np.int32)
        run_ours = functools.partial(_run_ours, ours, params, jax.device_put(tokens_BT),
                                     jax.device_put(mask_BT))
        run_theirs = functools.partial(_run_theirs, theirs, torch.from_numpy(tokens_BT).long(),
                                       torch.from_numpy(mask_BT).long())
        (first_ours, *ours_s), (first_theirs, *theirs_s), logits, want = alternate(
            run_ours, run_theirs, args.repeats)
        diff = float(np.abs(logits[-1] - want[-1]).max())
        rows.append((b, t, first_ours, ours_s, first_theirs, theirs_s, diff))

    print(f"## forward, float32, {threads} thread(s) each, {args.repeats} timed calls each "
          "(alternating ours / transformers) after one first call\n")
    print(machine.describe(gflops) + "\n")
    print("| batch x len | ours tok/s best (median) | transformers tok/s best (median) "
          "| ours / transformers (best) | ours first call s | transformers first call s "
          "| max abs logit diff |")
    print("|---|---|---|---|---|---|---|")
    for b, t, first_ours, ours_s, first_theirs, theirs_s, diff in rows:
        n = b * t
        print(f"| {b} x {t} | {n / min(ours_s):,.0f} ({n / statistics.median(ours_s):,.0f}) "
              f"| {n / min(theirs_s):,.0f} ({n / statistics.median(theirs_s):,.0f}) "
              f"| {min(theirs_s) / min(ours_s):.2f} | {first_ours:.2f} | {first_theirs:.2f} "
              f"| {diff:.1e} |")


if __name__ == "__main__":
    main()

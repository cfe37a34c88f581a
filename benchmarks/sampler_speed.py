"""Sampling tokens/s: our jitted sampler vs transformers' `generate`, side by side on one CPU.

Both sides get SmolLM2-135M-Instruct in `--dtype` (float32 or bfloat16 weights and
activations), the same chat-formatted prompts, temperature 1.0 and top-p 0.9 (no top-k), and
produce exactly `--new-tokens` tokens per row: transformers through `min_new_tokens`, ours by
an EOS id outside the vocabulary, which is never drawn. Transformers gets the prompts
left-padded to a bucket; ours, like the training loop, prefills their common opening (the
chat template's system turn) once (`common_prefix`; `--no-share-prefix` turns it off) and
prefills the rows' own tokens packed into fewer, longer lines where that saves padding
(`pack_rows`; `--no-pack` turns it off). Each batch size runs one first call (ours: compile
+ run) and `--repeats` timed calls, alternating ours / transformers. Then, at the last batch
size, the parts of one decode step are timed alone (`--no-breakdown` skips it).

Usage: python benchmarks/sampler_speed.py [--batch-sizes 1 16 64] [--new-tokens 64]
       [--num-samples 1] [--repeats 2] [--threads N] [--dtype float32|bfloat16]
"""
# ruff: noqa: E402

from __future__ import annotations

import os

# libgomp reads this once, when torch loads it; see forward.py and the README.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import machine
import numpy as np
import torch
from forward import alternate, load_torch_model

from models import ModelConfig, decode_step, prefill, unstack_layers
from models.gguf_io import find_smollm2_gguf, load_gguf, load_gguf_tokenizer
from sampling import SamplingOptions, common_prefix, sample_prompts, sampling_logprobs
from sampling.batching import bucket, packed_lines, prompt_buckets
from sampling.truncation import draw

INSTRUCTIONS = [
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a ten-year-old.",
    "Give me three tips for a job interview.",
    "What is the capital of Australia?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Translate 'good morning' into French and Spanish.",
    "List five fruits that are high in vitamin C.",
    "Write a short thank-you note to a teacher.",
    "How do I boil an egg?",
    "Describe the water cycle.",
    "Suggest a name for a pet goldfish.",
    "What are the benefits of regular exercise?",
    "Write a limerick about a cat who loves pizza.",
    "Explain what a black hole is in simple words.",
    "Give me a recipe for a quick breakfast.",
    "What is the difference between weather and climate?",
    "Write a two-line poem about the sea.",
    "How many continents are there? Name them.",
    "Give an example of a metaphor.",
    "Why is the sky blue?",
    "Write a tweet announcing a new coffee shop.",
    "What does a computer's CPU do?",
    "Describe your ideal weekend in three sentences.",
    "Explain the rules of tic-tac-toe.",
    "Write a motivational quote for Monday morning.",
    "What is 15 percent of 80? Show your steps.",
    "Suggest three books for someone who likes mysteries.",
    "How can I save water at home?",
    "Write a short story opening about a lost key.",
    "What causes the seasons on Earth?",
    "Give me a packing list for a beach trip.",
    "Explain what recycling is and why it matters.",
    "Write an email asking a colleague for a meeting.",
    "Name three famous painters and one work by each.",
    "How does a rainbow form?",
    "Write a riddle and give its answer.",
    "What is the Pythagorean theorem?",
    "Give me five ideas for a birthday party theme.",
    "Describe a sunset using three adjectives.",
    "What should I do if I feel stressed before an exam?",
    "Explain what DNA is in one paragraph.",
    "Write a product description for a reusable water bottle.",
    "List the planets of the solar system in order.",
    "What is a verb? Give two examples.",
    "Write a short apology for being late.",
    "How do bees make honey?",
    "Give me a fun fact about octopuses.",
    "Write a four-line song chorus about friendship.",
    "What are the primary colors?",
    "Explain how to plant a tomato seedling.",
    "Write a dialogue between a robot and a child.",
    "Why do we need sleep?",
    "Suggest a healthy snack for the afternoon.",
    "What is the boiling point of water at sea level?",
    "Describe the taste of a lemon to someone who never had one.",
    "Write instructions for making a paper airplane.",
    "What is the largest animal on Earth?",
    "Give me two arguments for reading every day.",
    "Write a short welcome message for a new club member.",
    "Explain what an ecosystem is.",
    "What is the difference between a virus and a bacterium?",
    "Write a slogan for a bicycle repair shop.",
    "How do magnets work?",
    "Plan a simple three-day workout routine.",
]


# ------------------------------------------------------------------------------- setup
def _chat_tokens(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True,
                                               tokenize=True)["input_ids"])
            for text in texts]


def _left_padded(prompts: list[list[int]], length: int, pad_id: int):
    tokens_BT = np.full((len(prompts), length), pad_id, np.int32)
    mask_BT = np.zeros((len(prompts), length), np.int32)
    for row, p in enumerate(prompts):
        tokens_BT[row, length - len(p):], mask_BT[row, length - len(p):] = p, 1
    return tokens_BT, mask_BT


def _own_layout(prompts: list[list[int]], shared: int, max_prompt_len: int,
                pack: bool) -> tuple[int, int]:
    """(bucket, packed lines) of ours: the length each row's own tokens (after a `shared`
    prefix) are padded to, and the lines of twice that length they are prefilled in (0: not
    packed)."""
    t = bucket(max(len(q) for q in prompts) - shared, prompt_buckets(max_prompt_len - shared))
    return t, packed_lines([len(q) - shared for q in prompts], t) if pack else 0


def _layout_text(shared: int, t: int, lines: int) -> str:
    return f"{shared} + {t}" + (f", packed into {lines} lines of {2 * t}" if lines else "")


def model_flops(config: ModelConfig, prompt_lens: list[int], new_tokens: int,
                num_samples: int, shared: int = 0) -> float:
    """Useful model FLOPs of one call: real prompt tokens prefilled, then new-1 decode steps.

    2 FLOPs per multiply-add of every weight matrix (the tied LM head only where logits are
    used) plus attention, 4 * layers * heads * head_dim per (query, visible key) pair.
    Padding and the masked cache slots a dense implementation also computes are not counted;
    the weight matmuls of a `shared` prefix are counted once per call.
    """
    c = config
    d, f = c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    body = c.num_hidden_layers * (d * (2 * q + 2 * kv) + 3 * d * f)
    head = d * c.vocab_size
    attn = 4 * c.num_hidden_layers * q
    total = 0.0
    for t in prompt_lens:
        total += 2 * body * t + attn * t * (t + 1) / 2 + 2 * head  # prefill
        ctx = t + np.arange(1, new_tokens)  # the i-th new token is fed at context t + i
        total += num_samples * float(np.sum(2 * (body + head) + attn * ctx))
    return total - 2 * body * shared * max(len(prompt_lens) - 1, 0)


# ------------------------------------------------------------------------------- timing
def _run_ours(params, prompts, *, config, opts, max_prompt_len, dtype, prefix, pack) -> int:
    out = sample_prompts(params, prompts, list(range(len(prompts))), config=config, opts=opts,
                         seed=0, iteration=0, batch_size=len(prompts),
                         max_prompt_len=max_prompt_len, dtype=dtype, shared_prefix=prefix,
                         pack=pack)
    return out.tokens_generated


@torch.inference_mode()
def _run_theirs(model, tokens_BT, mask_BT, *, opts: SamplingOptions, eos_id: int) -> int:
    out = model.generate(
        input_ids=torch.from_numpy(tokens_BT).long(), attention_mask=torch.from_numpy(mask_BT),
        do_sample=True, temperature=opts.temperature, top_p=opts.top_p, top_k=0,
        max_new_tokens=opts.max_new_tokens, min_new_tokens=opts.max_new_tokens,
        num_return_sequences=opts.num_samples, pad_token_id=opts.pad_id, eos_token_id=eos_id)
    return out.shape[0] * (out.shape[1] - tokens_BT.shape[1])


def _best_ms(fn, *args, repeats: int = 5) -> float:
    """Best of `repeats` calls after one (compiling) call, in milliseconds."""
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def _breakdown(params, config: ModelConfig, prompts, tokens_BT, mask_BT, *,
               opts: SamplingOptions, max_prompt_len: int, gflops: float, total_ms: float,
               dtype: str, prefix: tuple[int, ...], pack: bool) -> list:
    """(part, best ms, ms at the measured matmul GFLOP/s) for prefill and one decode step."""
    n, new, p = opts.num_samples, opts.max_new_tokens, len(prefix)
    lens = [int(m.sum()) for m in mask_BT]
    own_t, lines = _own_layout(prompts, p, max_prompt_len, pack)
    if p:  # the layout ours decodes from: the shared prefix's slots, then each row's own tokens
        tokens_BT, mask_BT = _left_padded([q[p:] for q in prompts], own_t, opts.pad_id)
    b, t = tokens_BT.shape
    rows, d, v = b * n, config.hidden_size, config.vocab_size
    one_token = functools.partial(_run_ours, params, prompts, config=config,
                                  opts=dataclasses.replace(opts, max_new_tokens=1),
                                  max_prompt_len=max_prompt_len, dtype=dtype, prefix=prefix,
                                  pack=pack)
    first_ms = _best_ms(one_token, repeats=3)
    weights = jax.tree.map(lambda w: w.astype(dtype), params)
    fill = jax.jit(functools.partial(prefill, config=config, max_len=p + t + new, dtype=dtype))
    _, cache = fill(weights, np.repeat(tokens_BT, n, 0), np.repeat(mask_BT, n, 0),
                    prefix_F=np.asarray(prefix, np.int32) if p else None)
    logits_RV = 3 * jax.random.normal(jax.random.key(0), (rows, v))  # nucleus > 256 tokens
    peaked_RV = 10 * jax.random.normal(jax.random.key(3), (rows, v))  # nucleus < 256 tokens
    u_R = jax.random.uniform(jax.random.key(4), (rows,))
    hidden_RD = jax.random.normal(jax.random.key(1), (rows, d), dtype)
    top_p_fn = functools.partial(sampling_logprobs, temperature=1.0, top_k=0, top_p=opts.top_p)
    draw_fn = jax.jit(functools.partial(draw, temperature=1.0, top_k=0, top_p=opts.top_p))
    plain_fn = functools.partial(sampling_logprobs, temperature=1.0, top_k=0, top_p=1.0)

    step_flops = model_flops(config, lens, 2, n) - model_flops(config, lens, 1, n)
    at_peak = lambda flops: flops / gflops / 1e6
    head = lambda x, w: jnp.einsum("rd,vd->rv", x, w, preferred_element_type=jnp.float32)
    return [
        (f"prefill [{b},{t}]{f' packed into [{lines},{2 * t}]' if lines else ''}"
         f"{f' after the shared prefix [1,{p}]' if p else ''} + first draw "
         "(a call with 1 new token)", first_ms, at_peak(model_flops(config, lens, 1, n, p))),
        (f"one loop step in the call = (best call - the above) / {new - 1}",
         (total_ms - first_ms) / (new - 1), at_peak(step_flops)),
        ("decode_step alone (30 layers + LM head + cache write)",
         _best_ms(jax.jit(functools.partial(decode_step, config=config, dtype=dtype)),
                  jax.jit(unstack_layers)(weights), jnp.zeros((rows,), jnp.int32), cache),
         at_peak(step_flops)),
        (f"LM head alone [{rows},{d}] x [{d},{v}]",
         _best_ms(jax.jit(head), hidden_RD, weights["embed"]["embedding"]),
         at_peak(2 * rows * d * v)),
        (f"draw, top-p {opts.top_p}: every row inside its 256 candidates [{rows},{v}]",
         _best_ms(draw_fn, u_R, peaked_RV), None),
        (f"draw, top-p {opts.top_p}: every row falls back to the full vocabulary",
         _best_ms(draw_fn, u_R, logits_RV), None),
        (f"sampling_logprobs, top-p {opts.top_p} [{rows},{v}] (the fallback's bisection)",
         _best_ms(jax.jit(top_p_fn), logits_RV), None),
        (f"sampling_logprobs, top-p 1 (log_softmax only) [{rows},{v}]",
         _best_ms(jax.jit(plain_fn), logits_RV), None),
        (f"for comparison: jnp.sort [{rows},{v}] (a sort-based top-p)",
         _best_ms(jax.jit(lambda x: jnp.sort(x, axis=-1)), logits_RV, repeats=2), None),
        (f"for comparison: lax.top_k(256) [{rows},{v}] (a top-k prefilter for top-p)",
         _best_ms(jax.jit(lambda x: jax.lax.top_k(x, 256)), logits_RV), None),
    ]


# ------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=1, help="responses per prompt")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the first")
    parser.add_argument("--max-prompt-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="default: every usable core")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and activations on both sides")
    parser.add_argument("--no-share-prefix", action="store_true",
                        help="ours prefills every prompt whole, as transformers does")
    parser.add_argument("--no-pack", action="store_true",
                        help="ours prefills each prompt in its own padded row")
    parser.add_argument("--no-breakdown", action="store_true")
    args = parser.parse_args()

    threads = machine.limit_cores(args.threads)  # before XLA starts its thread pool
    torch.set_num_threads(threads)
    gflops = machine.matmul_gflops(dtype=args.dtype)
    path = find_smollm2_gguf()
    config, params = load_gguf(path)
    params = jax.device_put(params)  # NumPy leaves would be copied into XLA on every call
    # first: it also silences transformers' progress bars
    theirs = load_torch_model(path).to(getattr(torch, args.dtype))
    tokenizer = load_gguf_tokenizer(path)
    n, new = args.num_samples, args.new_tokens
    # an id outside the vocabulary is never drawn, so every row runs the full budget
    opts = SamplingOptions(max_new_tokens=new, eos_ids=(config.vocab_size,),
                           pad_id=tokenizer.pad_token_id, num_samples=n, temperature=1.0,
                           top_p=args.top_p)
    all_prompts = _chat_tokens(tokenizer, INSTRUCTIONS)
    # the prompt set's common opening, as the training loop computes it: fixed for every batch
    prefix = () if args.no_share_prefix else common_prefix(all_prompts)

    results = []
    for b in args.batch_sizes:
        prompts = [all_prompts[i % len(all_prompts)] for i in range(b)]
        t = bucket(max(len(p) for p in prompts), prompt_buckets(args.max_prompt_len))
        tokens_BT, mask_BT = _left_padded(prompts, t, opts.pad_id)  # what ours builds, too
        run_ours = functools.partial(_run_ours, params, prompts, config=config, opts=opts,
                                     max_prompt_len=args.max_prompt_len, dtype=args.dtype,
                                     prefix=prefix, pack=not args.no_pack)
        run_theirs = functools.partial(_run_theirs, theirs, tokens_BT, mask_BT, opts=opts,
                                       eos_id=tokenizer.eos_token_id)
        (first, *ours), (_, *hf), ours_n, hf_n = alternate(run_ours, run_theirs, args.repeats)
        if set(ours_n + hf_n) != {b * n * new}:
            raise RuntimeError(f"new tokens per call: ours {ours_n}, transformers {hf_n}; "
                               f"want {b * n * new}")
        flops = model_flops(config, [len(p) for p in prompts], new, n, len(prefix))
        results.append((b, tokens_BT, mask_BT, ours, hf, first, flops))
        print(f"batch {b}: ours {min(ours):.2f} s, transformers {min(hf):.2f} s", flush=True)

    print(f"\n## sampler, {args.dtype}, {threads} thread(s) each, {new} new tokens per row, "
          f"top-p {args.top_p}, temperature 1.0, {n} sample(s) per prompt, {args.repeats} timed "
          "calls each (alternating ours / transformers) after one first call\n")
    print(machine.describe(gflops, dtype=args.dtype) + "\n")
    print("| batch (rows) | transformers' prompt bucket | ours: shared prefix + bucket | ours "
          "tok/s best (median) | transformers tok/s best (median) | ours / transformers | ours "
          "first call s | ours % of matmul GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    p = len(prefix)
    for b, tokens_BT, _, ours, hf, first, flops in results:
        count = b * n * new
        pct = 100 * flops / min(ours) / (gflops * 1e9)
        prompts = [all_prompts[i % len(all_prompts)] for i in range(b)]
        layout = _layout_text(p, *_own_layout(prompts, p, args.max_prompt_len, not args.no_pack))
        print(f"| {b} ({b * n}) | {tokens_BT.shape[1]} | {layout} "
              f"| {count / min(ours):,.0f} "
              f"({count / statistics.median(ours):,.0f}) | {count / min(hf):,.0f} "
              f"({count / statistics.median(hf):,.0f}) | {min(hf) / min(ours):.2f} "
              f"| {first:.1f} | {pct:.1f}% |")

    if args.no_breakdown:
        return
    b, tokens_BT, mask_BT, ours, *_ = results[-1]
    prompts = [all_prompts[i % len(all_prompts)] for i in range(b)]
    parts = _breakdown(params, config, prompts, tokens_BT, mask_BT, opts=opts,
                       max_prompt_len=args.max_prompt_len, gflops=gflops,
                       total_ms=1e3 * min(ours), dtype=args.dtype, prefix=prefix,
                       pack=not args.no_pack)
    print(f"\n### where one call's time goes at batch {b} ({b * n} rows)\n")
    print("| part | best ms | ms at the measured matmul GFLOP/s |")
    print("|---|---|---|")
    for name, ms, ideal in parts:
        print(f"| {name} | {ms:.1f} | {'' if ideal is None else f'{ideal:.1f}'} |")


if __name__ == "__main__":
    main()

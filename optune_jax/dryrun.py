"""`python -m optune_jax.dryrun --config FILE [--devices N] [--device-memory-gb G]`: will it fit?

Builds the config's mesh, lowers and compiles the training step and the sampler's `generate`
on abstract inputs (`jax.ShapeDtypeStruct`s carrying their shardings: no weight is allocated)
and prints per-device memory from the shardings and from the compiled programs' memory
analysis. `--devices 8` simulates 8 CPU devices, so a plan for 8 accelerators can be checked
anywhere; XLA:CPU's buffer assignment then stands in for the accelerator compiler's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of one run's two programs (train step, sampler) and what they hold."""

    summary: tuple[str, ...]  # model, mesh, batch and compile-time lines
    params: int
    adapters: int  # LoRA's trainable adapters (0 without LoRA)
    opt_state: int
    batch: int
    prompts: int
    train_temp: int  # activations, gradients, gathered weights: the compiled step's temporaries
    train_out: int  # outputs not aliased to (donated) inputs
    decode_params: int  # the weights' copy in the decode layout, alive while sampling
    reshard_temp: int  # the copy's resharding program's temporaries (before sampling)
    sample_temp: int  # the sampler's temporaries, the KV cache included
    sample_out: int
    kv_cache: int  # keys and values, split like the batch and the kv heads

    @property
    def train_peak(self) -> int:
        state = self.params + self.adapters + self.opt_state
        return state + self.batch + self.train_temp + self.train_out

    @property
    def sample_peak(self) -> int:  # the train state stays on the devices while sampling
        state = self.params + self.adapters + self.opt_state + self.decode_params
        return state + max(self.reshard_temp, self.prompts + self.sample_temp + self.sample_out)

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.sample_peak)


def architecture(model):
    """The ModelConfig of the `model` section, read without loading any weight."""
    from models import SMOLLM2, ModelConfig, find_smollm2_gguf, load_tokenizer
    from models.gguf_io import read_gguf_config
    from optune_jax.components import random_architecture

    if model.checkpoint == "random":
        r = model.random
        tokenizer = None if r.vocab_size else load_tokenizer(model.tokenizer or SMOLLM2)
        return random_architecture(r, tokenizer)
    if model.checkpoint == SMOLLM2:
        return read_gguf_config(find_smollm2_gguf())
    if model.checkpoint.endswith(".gguf"):
        return read_gguf_config(model.checkpoint)
    return ModelConfig.from_json(Path(model.checkpoint) / "config.json")


def _abstract(tree, shardings):
    import jax

    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def train_inputs(cfg, config, layout):
    """Abstract (state, batch, frozen, params) as the loop feeds the train step, the state's
    shardings, and the optimizer and LoRA spec: built by the functions the loop builds them
    with (`components`, `optimizer`)."""
    import jax
    import jax.numpy as jnp

    from losses import get_loss
    from models import init_params
    from optune_jax import sharding
    from optune_jax.batch import PairBatch
    from optune_jax.components import adapter_shardings, init_adapters, lora_spec
    from optune_jax.optimizer import TrainState, build_optimizer, state_shardings
    from optune_jax.packing import longest_line

    t, m = cfg.train, cfg.model
    shapes = jax.eval_shape(
        lambda: init_params(config, jax.random.key(0), param_dtype=m.param_dtype)
    )
    params = _abstract(shapes, sharding.param_shardings(config, layout))
    trainable, frozen, lora = params, None, lora_spec(cfg.lora)
    if lora is not None:
        adapters = jax.eval_shape(lambda: init_adapters(shapes, lora, cfg.run.seed))
        trainable = _abstract(adapters, adapter_shardings(adapters, config, lora, layout))
        frozen = params
    # the schedule's length lives in the optimizer state, so any count compiles the same program
    optimizer = build_optimizer(t, updates_per_iteration=100).transform
    shardings = state_shardings(
        optimizer, trainable, jax.tree.map(lambda x: x.sharding, trainable), layout.mesh
    )
    init = lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p))
    state = _abstract(jax.eval_shape(init, trainable), shardings)
    # A micro-batches of M pairs, each row prompt + response tokens (optune_jax.pair_rows)
    a, mb = t.batch_size // t.micro_batch_size, t.micro_batch_size
    seq = cfg.data.max_prompt_tokens + cfg.sampling.max_new_tokens
    samples = cfg.hypo.samples_per_prompt if get_loss(cfg.loss.name).needs_samples else 0
    split = sharding.batch_sharding(layout, mb, axis=1)
    packed = None
    if t.pack:  # the worst case: a line per pair (optune_jax.packing)
        y, branches = cfg.sampling.max_new_tokens, 2 + samples
        line = longest_line(cfg.data.max_prompt_tokens, y, branches)
        packed = (mb, line, mb * branches * y)
    batch = PairBatch.abstract((a, mb), seq, samples=samples, sharding=split, packed=packed)
    return state, shardings, batch, frozen, params, optimizer, lora


def lower_train_step(cfg, config, layout):
    """(the train step as the loop builds it (`components.train_program`), lowered on abstract
    inputs; those inputs)."""
    import jax

    from optune_jax.components import train_program

    state, shardings, batch, frozen, params, optimizer, lora = train_inputs(cfg, config, layout)
    step, _ = train_program(
        cfg, config, layout, optimizer=optimizer, lora=lora, state_shardings=shardings,
        frozen_shardings=jax.tree.map(lambda x: x.sharding, frozen),
    )
    return step.lower(state, batch, frozen), (state, batch, frozen, params, lora)


def plan(cfg, devices) -> Plan:
    """Compiles the train step and `generate` for `cfg` on a mesh over `devices`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models import cache_slots
    from optune_jax import sharding
    from optune_jax.components import build_layout
    from sampling import SamplingOptions, generate

    config = architecture(cfg.model)
    m, t, s, p_len = cfg.mesh, cfg.train, cfg.sampling, cfg.data.max_prompt_tokens
    layout = build_layout(m, devices)
    mesh = layout.mesh
    start = time.perf_counter()
    lowered, (state, batch, frozen, params, lora) = lower_train_step(cfg, config, layout)
    train = lowered.compile().memory_analysis()
    train_s = time.perf_counter() - start

    # the sampler as `optune_jax.generate` runs it: the weights copied into the decode layout,
    # then one generate call of sampling.batch_size prompts, num_samples each
    b, n, infer = s.batch_size, s.num_samples, layout.decoding()
    opts = SamplingOptions(max_new_tokens=s.max_new_tokens, eos_ids=(0,), pad_id=0, num_samples=n)
    split = sharding.batch_sharding(infer, b)
    prompt = jax.ShapeDtypeStruct((b, p_len), np.int32, sharding=split)
    ids = jax.ShapeDtypeStruct((b,), np.int32, sharding=split)
    start = time.perf_counter()
    to_decode = sharding.to_decode_layout(config, layout, cfg.model.dtype).lower(params)
    decode_params = to_decode.out_info
    reshard = to_decode.compile().memory_analysis()
    with sharding.rules_context(infer):
        kw = dict(config=config, opts=opts, dtype=cfg.model.dtype)
        lowered = generate.lower(decode_params, prompt, prompt, ids, 0, 0, **kw)
    sample = lowered.compile().memory_analysis()
    sample_s = time.perf_counter() - start

    rows, slots = n * b, cache_slots(config, p_len + s.max_new_tokens)
    shape = (rows, config.num_key_value_heads, slots, config.head_dim)  # one layer's keys
    layer_cache = jax.ShapeDtypeStruct(
        shape,
        jnp.dtype(cfg.model.dtype),
        sharding=sharding.logical_sharding(shape, ("batch", "kv_heads", None, None), infer),
    )
    per_device = sharding.per_device_bytes
    a, mb = t.batch_size // t.micro_batch_size, t.micro_batch_size
    summary = (
        f"model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab "
        f"{config.vocab_size}, {sum(x.size for x in jax.tree.leaves(params)) / 1e9:.2f}B "
        f"parameters in {cfg.model.param_dtype}, compute in {cfg.model.dtype}, remat "
        f"{cfg.model.remat}",
        f"mesh (data, fsdp, tensor) = {tuple(mesh.shape.values())} over {mesh.devices.size} "
        f"{mesh.devices.flat[0].platform} devices",
        f"train step: {t.batch_size} pairs = {a} micro-batches x {mb}, "
        f"{p_len + s.max_new_tokens} tokens a row, micro-batch split "
        f"{jax.tree.leaves(batch)[0].sharding.spec}; compiled in {train_s:.0f}s",
        f"sampler: {b} prompts x {n} samples, {p_len} + {s.max_new_tokens} tokens, prompts split "
        f"{split.spec}, weights in the decode layout (q_proj "
        f"{jax.tree.leaves(decode_params['layers_0']['attn']['q_proj'])[0].sharding.spec}); "
        f"compiled in {sample_s:.0f}s",
    )
    trainable = per_device(state.params)
    return Plan(
        summary=summary,
        params=per_device(params),
        adapters=trainable if lora is not None else 0,
        opt_state=per_device(state.opt_state),
        batch=per_device(batch),
        prompts=per_device((prompt, prompt, ids)),
        train_temp=train.temp_size_in_bytes,
        train_out=train.output_size_in_bytes - train.alias_size_in_bytes,
        decode_params=per_device(decode_params),
        reshard_temp=reshard.temp_size_in_bytes,
        sample_temp=sample.temp_size_in_bytes,
        sample_out=sample.output_size_in_bytes,
        kv_cache=2 * config.num_hidden_layers * per_device(layer_cache),
    )


def report(p: Plan, cfg, device_memory_gb: float) -> list[str]:
    """The plan as text: summary lines, a per-device table, the verdict."""
    unit, size = ("GiB", GIB) if p.peak >= GIB else ("MiB", 2**20)
    f = lambda x: f"{x / size:.2f}"
    table = [
        (f"parameters ({cfg.model.param_dtype})", f(p.params), f(p.params)),
        *([("LoRA adapters", f(p.adapters), f(p.adapters))] if p.adapters else []),
        (f"optimizer state ({cfg.train.optimizer})", f(p.opt_state), f(p.opt_state) + " resident"),
        (f"weights in the decode layout ({cfg.model.dtype})", "", f(p.decode_params)),
        ("batch / prompts", f(p.batch), f(p.prompts)),
        ("resharding temporaries (before sampling)", "", f(p.reshard_temp)),
        ("activations, gradients, temporaries", f(p.train_temp), f(p.sample_temp)),
        (f"of which KV cache ({cfg.model.dtype})", "", f(p.kv_cache)),
        ("outputs not aliased to inputs", f(p.train_out), f(p.sample_out)),
        ("**peak**", f"**{f(p.train_peak)}**", f"**{f(p.sample_peak)}**"),
    ]
    limit = device_memory_gb * GIB
    verdict = "fits" if p.peak < limit else "DOES NOT FIT"
    return [
        *p.summary,
        "",
        f"| per device, {unit} | train step | sampler |",
        "|---|---:|---:|",
        *(f"| {a} | {b} | {c} |" for a, b, c in table),
        "",
        f"{verdict}: peak {p.peak / GIB:.1f} GiB of {device_memory_gb:.0f} GiB per device "
        f"({100 * p.peak / limit:.0f}%), {(limit - p.peak) / GIB:.1f} GiB to spare",
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m optune_jax.dryrun",
        description="Compile a run's train step and sampler on abstract inputs; print memory.",
    )
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="simulate this many CPU devices (default: the machine's own devices)",
    )
    p.add_argument(
        "--device-memory-gb",
        type=float,
        default=None,
        help="memory of one device in GiB (default: the device's own limit, else 80)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Prints the plan; exit status 0 if it fits, 1 if not, 2 for bad input."""
    args = parse_args(argv)
    if args.devices and "jax" not in sys.modules:  # XLA reads these when jax starts
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
    from optune_jax.run.config_file import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        import jax

        devices = jax.devices()
        if args.devices:
            if len(devices) < args.devices:
                raise ValueError(f"--devices {args.devices}: only {len(devices)} devices here")
            devices = devices[: args.devices]
        memory = args.device_memory_gb
        if memory is None:
            stats = devices[0].memory_stats() or {}
            memory = stats["bytes_limit"] / GIB if "bytes_limit" in stats else 80.0
        result = plan(cfg, devices)
    except ValueError as e:  # ConfigError, ModelConfigError, mesh shapes
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report(result, cfg, memory)))
    return 0 if result.peak < memory * GIB else 1


if __name__ == "__main__":
    sys.exit(main())

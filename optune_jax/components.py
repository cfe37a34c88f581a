"""What every trainer and the dry run build from a config, one function each: the policy, the
layout (mesh and rules), LoRA adapters and where they live, and the jitted train program."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from models import SMOLLM2, ModelConfig, init_params, load_pretrained, load_tokenizer
from models.lora import LoraSpec, init_lora, lora_logical_axes
from optune_jax import sharding
from optune_jax.run import distributed
from optune_jax.run.schema import (
    LoraSection,
    LossSection,
    MeshSection,
    ModelSection,
    RandomModel,
    RunConfig,
)
from optune_jax.train_step import LossChoice, PolicySpec, train_step


@dataclasses.dataclass
class Policy:
    config: ModelConfig
    tokenizer: object
    eos_ids: tuple[int, ...]
    pad_id: int


def random_architecture(r: RandomModel, tokenizer=None) -> ModelConfig:
    """The architecture `model.random` describes; vocabulary and special ids from `tokenizer`
    (None: `r.vocab_size` and ModelConfig's default ids, enough for shapes)."""
    special = {}
    if tokenizer is not None:
        special = dict(
            eos_token_id=(tokenizer.eos_token_id,),
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return ModelConfig(
        vocab_size=r.vocab_size or len(tokenizer),
        hidden_size=r.hidden_size,
        intermediate_size=r.intermediate_size,
        num_hidden_layers=r.num_hidden_layers,
        num_attention_heads=r.num_attention_heads,
        num_key_value_heads=r.num_key_value_heads,
        head_dim=r.head_dim,
        sliding_window=r.sliding_window,
        tie_word_embeddings=r.tie_word_embeddings,
        model_type="mistral",
        **special,
    )


def policy_tokenizer(model):
    """The tokenizer of a config's `model` section (without loading any weights)."""
    source = model.tokenizer or (SMOLLM2 if model.checkpoint == "random" else model.checkpoint)
    return load_tokenizer(source)


def load_policy(cfg, layout: sharding.Layout | None = None, tokenizer=None):
    """(Policy, initial params) from a config's `model` section (and `run.seed`): a pretrained
    checkpoint or a random init. With a `layout`, the parameters are created in (or copied
    straight into) their shards. `tokenizer`: the model's, when already loaded."""
    model = cfg.model
    tokenizer = tokenizer or policy_tokenizer(model)
    if model.checkpoint == "random":
        config = random_architecture(model.random, tokenizer)
        key = jax.random.key(cfg.run.seed)
        if layout is not None:
            params = sharding.init_sharded_params(
                config, key, layout, param_dtype=model.param_dtype
            )
        else:
            params = init_params(config, key, param_dtype=model.param_dtype)
    else:
        config, params = load_pretrained(model.checkpoint, dtype=model.param_dtype)
        if layout is not None:
            params = distributed.put(params, sharding.param_shardings(config, layout))
        else:
            params = jax.tree.map(jnp.asarray, params)
    eos = tuple(dict.fromkeys([*config.eos_token_id, tokenizer.eos_token_id]))
    return Policy(config, tokenizer, eos, int(tokenizer.pad_token_id)), params


def build_layout(m: MeshSection, devices=None) -> sharding.Layout:
    """The `mesh` section's mesh and logical-axis rules."""
    mesh = sharding.make_mesh((m.data, m.fsdp, m.tensor), devices)
    return sharding.Layout(mesh, sharding.make_rules(m.rules))


def policy_spec(config: ModelConfig, model: ModelSection, loss: LossSection) -> PolicySpec:
    """What the train step and the reference logps know of the policy (`train_step.PolicySpec`)."""
    return PolicySpec(config, model.dtype, model.remat, loss.average_logps, model.attention)


def lora_spec(lc: LoraSection) -> LoraSpec | None:
    """The adapters `lora` asks for; None when `lora.rank` is 0 (full fine-tuning)."""
    if lc.rank <= 0:
        return None
    return LoraSpec(lc.rank, lc.alpha, tuple(lc.targets), lc.num_adapters)


def init_adapters(params, lora: LoraSpec, seed: int):
    """Fresh LoRA adapters over `params` (run.seed + 1: the base's own init takes run.seed)."""
    return init_lora(params, lora, jax.random.key(seed + 1))


def adapter_shardings(adapters, config: ModelConfig, lora: LoraSpec, layout: sharding.Layout):
    """Where each adapter lives: split like the base weight it adapts (`lora_logical_axes`)."""
    return sharding.tree_shardings(adapters, lora_logical_axes(config, lora), layout)


def train_program(
    cfg: RunConfig,
    config: ModelConfig,
    layout: sharding.Layout,
    *,
    optimizer: optax.GradientTransformation,
    lora: LoraSpec | None,
    state_shardings,
    frozen_shardings,
):
    """(the jitted train step, the sharding of its batches [A, M]): the run's loss over the
    policy (design §2, §4 step 7). The trainer runs and the dry run measures this program."""
    batch_sharding = sharding.batch_sharding(layout, cfg.train.micro_batch_size, axis=1)
    step = functools.partial(
        train_step,
        optimizer=optimizer,
        policy=policy_spec(config, cfg.model, cfg.loss),
        loss=LossChoice.from_values(cfg.loss.name, dataclasses.asdict(cfg.loss)),
        prompt_len=cfg.data.max_prompt_tokens,
        lora=lora,
    )
    jitted = sharding.jit_train_step(
        step,
        layout,
        state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        frozen_shardings=frozen_shardings if lora else None,
    )
    return jitted, batch_sharding

"""What every trainer and the dry run build from a config: policy, mesh, optimizer, LoRA spec."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from models import SMOLLM2, ModelConfig, init_params, load_pretrained, load_tokenizer
from models.lora import LoraSpec
from optune_jax import sharding
from optune_jax.run import distributed
from optune_jax.run.schema import LoraSection, MeshSection, RandomModel, TrainSection
from optune_jax.train_step import make_optimizer


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


def load_policy(cfg, mesh=None, rules=sharding.DEFAULT_RULES, tokenizer=None):
    """(Policy, initial params) from a config's `model` section (and `run.seed`): a pretrained
    checkpoint or a random init. With a `mesh`, the parameters are created in (or copied
    straight into) their shards. `tokenizer`: the model's, when already loaded."""
    model = cfg.model
    tokenizer = tokenizer or policy_tokenizer(model)
    if model.checkpoint == "random":
        config = random_architecture(model.random, tokenizer)
        key = jax.random.key(cfg.run.seed)
        if mesh is not None:
            params = sharding.init_sharded_params(
                config, key, mesh, rules, param_dtype=model.param_dtype
            )
        else:
            params = init_params(config, key, param_dtype=model.param_dtype)
    else:
        config, params = load_pretrained(model.checkpoint, dtype=model.param_dtype)
        if mesh is not None:
            params = distributed.put(params, sharding.param_shardings(config, mesh, rules))
        else:
            params = jax.tree.map(jnp.asarray, params)
    eos = tuple(dict.fromkeys([*config.eos_token_id, tokenizer.eos_token_id]))
    return Policy(config, tokenizer, eos, int(tokenizer.pad_token_id)), params


def build_mesh(m: MeshSection, devices=None):
    """(mesh, logical-axis rules) of the `mesh` section."""
    return sharding.make_mesh((m.data, m.fsdp, m.tensor), devices), sharding.make_rules(m.rules)


def build_optimizer(t: TrainSection, total_steps: int) -> optax.GradientTransformation:
    """The `train` section's optimizer and schedule over a run of `total_steps` updates:
    decaying to 0 after the warm-up with `train.schedule: per_iteration` (TRL's), else constant."""
    return make_optimizer(
        name=t.optimizer,
        learning_rate=t.learning_rate,
        total_steps=total_steps,
        warmup_ratio=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        decay=t.schedule == "per_iteration",
    )


def lora_spec(lc: LoraSection) -> LoraSpec | None:
    """The adapters `lora` asks for; None when `lora.rank` is 0 (full fine-tuning)."""
    if lc.rank <= 0:
        return None
    return LoraSpec(lc.rank, lc.alpha, tuple(lc.targets), lc.num_adapters)

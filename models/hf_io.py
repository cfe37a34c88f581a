"""transformers safetensors checkpoints <-> our Flax parameter tree, tensor by tensor.

One table (`tensor_table`) names every checkpoint tensor, its Flax path and its layout; loading
(`load_hf_checkpoint`, and the GGUF loader through `params_from_tensors`) and exporting
(`export_hf_checkpoint`) both read it, so the two directions cannot drift apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from models.config import ModelConfig

Params = dict[str, Any]
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved
HEADS = {"lm": "ForCausalLM", "score": "ForSequenceClassification"}  # head -> architecture suffix
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read or written as asked."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One checkpoint tensor <-> one Flax leaf.

    `hf_name` holds "{i}" for per-layer tensors, which stack on a leading L axis in Flax.
    `transpose`: a torch Linear weight [out, in] becomes a kernel [in, ...]; the kernel's
    trailing axes split `out` (q: N*H -> N, H) or its leading axes split `in` (o: N*H -> N, H).
    """

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]  # per layer for layered entries
    transpose: bool

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf_name

    def names(self, num_layers: int) -> list[str]:
        if not self.layered:
            return [self.hf_name]
        return [self.hf_name.format(i=i) for i in range(num_layers)]

    def to_flax(self, w: np.ndarray) -> np.ndarray:
        return (w.T if self.transpose else w).reshape(self.flax_shape)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        if self.transpose:
            return w.reshape(self.hf_shape[::-1]).T
        return w.reshape(self.hf_shape)


def tensor_table(config: ModelConfig, *, head: str = "lm") -> tuple[TensorEntry, ...]:
    """Every tensor of a checkpoint and its Flax leaf.

    `head`: "lm" for MistralForCausalLM / LlamaForCausalLM, "score" for their
    ForSequenceClassification with num_labels = 1 (a reward model: no lm_head, `score.weight`).
    """
    if head not in HEADS:
        raise CheckpointError(f"head={head!r}; allowed: {', '.join(HEADS)}")
    v, d, f = config.vocab_size, config.hidden_size, config.intermediate_size
    n, k, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    lay = "model.layers.{i}."

    def e(hf_name, path, hf_shape, flax_shape, transpose=True):
        return TensorEntry(hf_name, tuple(path.split("/")), hf_shape, flax_shape, transpose)

    table = [
        e("model.embed_tokens.weight", "embed/embedding", (v, d), (v, d), False),
        e(lay + "input_layernorm.weight", "layers/attn_norm/scale", (d,), (d,), False),
        e(lay + "self_attn.q_proj.weight", "layers/attn/q_proj/kernel", (n * h, d), (d, n, h)),
        e(lay + "self_attn.k_proj.weight", "layers/attn/k_proj/kernel", (k * h, d), (d, k, h)),
        e(lay + "self_attn.v_proj.weight", "layers/attn/v_proj/kernel", (k * h, d), (d, k, h)),
        e(lay + "self_attn.o_proj.weight", "layers/attn/o_proj/kernel", (d, n * h), (n, h, d)),
        e(lay + "post_attention_layernorm.weight", "layers/mlp_norm/scale", (d,), (d,), False),
        e(lay + "mlp.gate_proj.weight", "layers/mlp/gate_proj/kernel", (f, d), (d, f)),
        e(lay + "mlp.up_proj.weight", "layers/mlp/up_proj/kernel", (f, d), (d, f)),
        e(lay + "mlp.down_proj.weight", "layers/mlp/down_proj/kernel", (d, f), (f, d)),
        e("model.norm.weight", "final_norm/scale", (d,), (d,), False),
    ]
    if head == "score":
        table.append(e("score.weight", "score/kernel", (1, d), (d, 1)))
    elif not config.tie_word_embeddings:
        table.append(e("lm_head.weight", "lm_head/kernel", (v, d), (d, v)))
    return tuple(table)


def _np_dtype(dtype: str) -> np.dtype:
    if dtype not in NP_DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; use {' or '.join(NP_DTYPES)}")
    return NP_DTYPES[dtype]


def _listing(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _ignored(name: str, config: ModelConfig) -> bool:
    # a tied checkpoint may still carry lm_head.weight (a copy of the embedding): drop it
    tied_head = config.tie_word_embeddings and name == "lm_head.weight"
    return tied_head or name.endswith(IGNORED_SUFFIXES)


def params_from_tensors(
    config: ModelConfig,
    shapes: Mapping[str, tuple[int, ...]],
    read: Callable[[str], np.ndarray],
    *,
    dtype: str = "float32",
    source: str = "checkpoint",
    head: str = "lm",
) -> Params:
    """Assembles the Flax tree from transformers-named tensors, one tensor in memory at a time.

    Args:
      config: the architecture the tensors must match.
      shapes: every tensor name in the source -> its shape (checked before any data is read).
      read: name -> NumPy array in transformers layout.
      dtype: "float32" or "bfloat16", the dtype of the returned NumPy leaves.
      source: what to call the source in error messages.
      head: "lm" or "score" (see `tensor_table`).
    Returns:
      The nested dict of NumPy arrays described in `tensor_table`.
    """
    np_dtype = _np_dtype(dtype)
    table = tensor_table(config, head=head)
    layers = config.num_hidden_layers
    expected = {name: entry for entry in table for name in entry.names(layers)}
    present = {name for name in shapes if not _ignored(name, config)}
    if missing := expected.keys() - present:
        raise CheckpointError(f"{source} lacks {len(missing)} tensor(s): {_listing(missing)}")
    if unexpected := present - expected.keys():
        raise CheckpointError(
            f"{source} has {len(unexpected)} unexpected tensor(s) for a {config.model_type} "
            f"model: {_listing(unexpected)}"
        )
    for name, entry in expected.items():
        if tuple(shapes[name]) != entry.hf_shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {list(shapes[name])}, but the config implies "
                f"{list(entry.hf_shape)}"
            )
    params: Params = {}
    for entry in table:
        leaf = np.empty(((layers,) if entry.layered else ()) + entry.flax_shape, np_dtype)
        for i, name in enumerate(entry.names(layers)):
            w = entry.to_flax(read(name))
            if entry.layered:
                leaf[i] = w
            else:
                leaf[...] = w
        node = params
        for key in entry.path[:-1]:
            node = node.setdefault(key, {})
        node[entry.path[-1]] = leaf
    return params


# ------------------------------------------------------------------------------------ load
def _weight_files(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name (relative to `path`)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index ({e})") from None
        if missing := {f for f in weight_map.values() if not (path / f).is_file()}:
            raise CheckpointError(f"{index} names missing shard file(s): {_listing(missing)}")
        return dict(weight_map)
    if (path / SINGLE_FILE).is_file():
        with safe_open(path / SINGLE_FILE, framework="numpy") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    hint = " (PyTorch .bin weights are not supported)" if any(path.glob("*.bin")) else ""
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}{hint}")


def _read_raw(file: Path, name: str) -> np.ndarray:
    """Reads one bfloat16 tensor via the header (safetensors format: u64 length, JSON, data)."""
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        info = json.loads(fh.read(n))[name]
        start, end = info["data_offsets"]
        fh.seek(8 + n + start)
        data = fh.read(end - start)
    return np.frombuffer(data, ml_dtypes.bfloat16).reshape(info["shape"])


def load_hf_checkpoint(
    path: str | Path, *, dtype: str = "float32", head: str = "lm"
) -> tuple[ModelConfig, Params]:
    """Reads a transformers MistralForCausalLM / LlamaForCausalLM safetensors directory.

    Args:
      path: directory with config.json and model.safetensors (or shards + index).
      dtype: "float32" or "bfloat16", the dtype of the returned leaves.
      head: "lm", or "score" for a *ForSequenceClassification checkpoint (see `tensor_table`).
    Returns:
      (config, params): params is a nested dict of NumPy arrays (layers stacked on axis 0),
      ready for `jax.device_put` with whatever sharding the caller wants.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    config = ModelConfig.from_json(path / "config.json")
    _np_dtype(dtype)
    files = _weight_files(path)
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(path / f, framework="numpy"))
                   for f in sorted(set(files.values()))}
        slices = {name: handles[f].get_slice(name) for name, f in files.items()}

        def read(name: str) -> np.ndarray:
            # older safetensors cannot make NumPy bfloat16 arrays, so those are read raw
            if slices[name].get_dtype() == "BF16":
                return _read_raw(path / files[name], name)
            return handles[files[name]].get_tensor(name)

        shapes = {name: tuple(s.get_shape()) for name, s in slices.items()}
        params = params_from_tensors(
            config, shapes, read, dtype=dtype, source=str(path), head=head
        )
    return config, params


# ---------------------------------------------------------------------------------- export
def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper())
    if not m:
        raise CheckpointError(f"max_shard_size={size!r}: use bytes (int) or a size like '5GB'")
    return int(float(m[1]) * _SIZE_UNITS[m[2]])


def _leaf(params: Params, path: tuple[str, ...]) -> Any:
    node = params
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise CheckpointError(f"params lack {'/'.join(path)}")
        node = node[key]
    return node


def _leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if not isinstance(tree, Mapping):
        return [prefix]
    return [p for k, v in tree.items() for p in _leaf_paths(v, prefix + (k,))]


def _check_params(params: Params, config: ModelConfig, table: tuple[TensorEntry, ...]) -> None:
    expected = {entry.path: entry for entry in table}
    if extra := set(_leaf_paths(params)) - expected.keys():
        hint = " (config.tie_word_embeddings is true)" if ("lm_head", "kernel") in extra else ""
        extra = _listing("/".join(p) for p in extra)
        raise CheckpointError(f"params have leaves the config does not describe: {extra}{hint}")
    for path, entry in expected.items():
        want = ((config.num_hidden_layers,) if entry.layered else ()) + entry.flax_shape
        got = tuple(np.shape(_leaf(params, path)))
        if got != want:
            raise CheckpointError(f"params {'/'.join(path)} has shape {list(got)}, "
                                  f"but the config implies {list(want)}")


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy, in order: a shard closes when the next tensor would push it past `max_bytes`."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _generation_config(config: ModelConfig) -> dict[str, Any]:
    eos = list(config.eos_token_id)
    out = {"_from_model_config": True, "bos_token_id": config.bos_token_id,
           "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": config.pad_token_id}
    return {k: v for k, v in out.items() if v is not None and v != []}


def _replace_dir(new: Path, target: Path) -> None:
    """Puts `new` at `target`; an existing `target` is swapped out first, then deleted."""
    if not target.exists():
        new.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old)


def export_hf_checkpoint(
    params: Params,
    config: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    dtype: str = "float32",
    max_shard_size: int | str = "5GB",
    head: str = "lm",
) -> Path:
    """Writes a transformers checkpoint directory that `AutoModelForCausalLM.from_pretrained` loads.

    Args:
      params: the Flax tree (NumPy or jax arrays; jax leaves are fetched one layer at a time).
      config: the architecture, written as config.json.
      out_dir: target directory; written in a temporary sibling and renamed into place, so
        an interrupted export leaves no partial directory (an existing one is replaced).
      tokenizer: optional transformers tokenizer, saved alongside (with its chat template).
      dtype: "float32" or "bfloat16" storage dtype.
      max_shard_size: bytes (int) or a size like "5GB"; larger checkpoints are sharded with
        a model.safetensors.index.json.
      head: "lm", or "score" for a *ForSequenceClassification checkpoint with num_labels = 1.
    Returns:
      The output directory.
    """
    out_dir = Path(out_dir)
    np_dtype = _np_dtype(dtype)
    max_bytes = _parse_size(max_shard_size)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"export target {out_dir} exists and is not a directory")
    table = tensor_table(config, head=head)
    _check_params(params, config, table)
    layers = config.num_hidden_layers
    where = {name: (entry, i) for entry in table for i, name in enumerate(entry.names(layers))}
    sizes = [(name, math.prod(e.hf_shape) * np_dtype.itemsize) for name, (e, _) in where.items()]
    shards = _plan_shards(sizes, max_bytes)
    files = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))
    ]

    def hf_tensor(name: str) -> np.ndarray:
        entry, i = where[name]
        leaf = _leaf(params, entry.path)
        w = np.asarray(leaf[i] if entry.layered else leaf)
        return np.ascontiguousarray(entry.to_hf(w).astype(np_dtype))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        hf_config = config.to_hf_dict() | {"torch_dtype": dtype}
        if head == "score":  # what transformers writes for num_labels = 1
            arch = hf_config["architectures"][0].replace(HEADS["lm"], HEADS["score"])
            hf_config |= {"architectures": [arch], "id2label": {"0": "LABEL_0"},
                          "label2id": {"LABEL_0": 0}}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(_generation_config(config), indent=2) + "\n"
        )
        for file, names in zip(files, shards, strict=True):
            save_file({n: hf_tensor(n) for n in names}, tmp / file, metadata={"format": "pt"})
        if len(files) > 1:
            index = {
                "metadata": {"total_size": sum(size for _, size in sizes)},
                "weight_map": {n: f for f, names in zip(files, shards, strict=True) for n in names},
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

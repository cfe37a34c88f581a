"""The evaluation of π_0, kept on disk and reused (design §9): every run of a study evaluates π_0
before iteration 0, the same computation for every variant of a seed.

A cached evaluation is found by a key over everything that determines it: π_0's weights (their
bytes), the held-out prompts (token ids and rows), the `model`, `lora`, `sampling`, `reward` and
`eval` settings (the divergence limits aside), the prompt settings, the seed, the mesh, and the
JAX version, backend and device count. A reward whose code changes under the same name is not
seen: delete the directory (or leave `eval.initial_cache` unset) after changing one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np

from optune_jax.run import distributed
from optune_jax.run.errors import file_error

FORMAT = 1  # the cache file's layout; a new one never reads an old one
_NOT_EVALUATION = ("divergence", "max_loss_ratio", "max_kl", "max_nll_rise", "initial_cache")


def key(cfg, params, prompts, rows) -> str:
    """The hex digest naming π_0's evaluation under `cfg` on held-out `prompts` (ids) and `rows`."""
    evaluation = {k: v for k, v in dataclasses.asdict(cfg.eval).items()
                  if k not in _NOT_EVALUATION}
    settings = {
        "format": FORMAT,
        "jax": [jax.__version__, jax.default_backend(), jax.device_count()],
        **{name: dataclasses.asdict(getattr(cfg, name))
           for name in ("model", "lora", "sampling", "reward", "mesh")},
        "eval": evaluation,
        "data": [cfg.data.max_prompt_tokens, cfg.data.prompt_column],
        "seed": cfg.run.seed,
        "prompts": [[int(t) for t in p] for p in prompts],
        "rows": list(rows),
    }
    h = hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(),
                        digest_size=16)
    for path, leaf in jax.tree_util.tree_leaves_with_path(distributed.get(params)):
        leaf = np.ascontiguousarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}".encode())
        h.update(leaf.view(np.uint8).reshape(-1).data)
    return h.hexdigest()


def load(directory: str | Path, digest: str) -> tuple[np.ndarray, dict] | None:
    """(per-prompt rewards [N], the evaluation's record) stored under `digest`, or None."""
    path = Path(directory) / f"{digest}.json"
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # unreadable or torn: evaluate again (and rewrite it)
        return None
    if stored.get("format") != FORMAT:
        return None
    return np.asarray(stored["rewards"], np.float32), stored["record"]


def save(directory: str | Path, digest: str, rewards: np.ndarray, record: dict) -> None:
    """Writes the evaluation whole or not at all (a temporary file renamed into place); the
    primary process writes, the others read it on their next run."""
    if not distributed.is_primary():
        return
    directory = Path(directory)
    path = directory / f"{digest}.json"
    tmp = directory / f".{digest}.{os.getpid()}.tmp"
    text = json.dumps({"format": FORMAT, "rewards": [float(r) for r in rewards],
                       "record": record})
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise file_error("write the evaluation of π_0 to", path, e, creating=True) from e

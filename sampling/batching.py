"""Host side of sampling: bucket prompts into a few padded shapes and run `generate` on them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models import ModelConfig, cache_slots
from sampling.sampler import SamplingOptions, generate


def length_buckets(max_len: int, smallest: int = 16, *, halves: bool = False) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `max_len` (always included).

    `halves` adds the size halfway between each pair (24, 48, 96, ...): twice the programs,
    at most a third of a row wasted on padding instead of a half.
    """
    sizes, b = [], smallest
    while b < max_len:
        sizes.append(b)
        if halves and b % 2 == 0 and b * 3 // 2 < max_len:
            sizes.append(b * 3 // 2)
        b *= 2
    return (*sizes, max_len)


def prompt_buckets(max_prompt_len: int) -> tuple[int, ...]:
    """The prompt lengths `sample_prompts` pads to (prefill cost follows the bucket)."""
    return length_buckets(max_prompt_len, halves=True)


def bucket(n: int, sizes: Sequence[int]) -> int:
    for size in sizes:
        if n <= size:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {max(sizes)}")


def _first_fit(lens: Sequence[int], width: int) -> np.ndarray:
    """First-fit decreasing: each row's line, the longest row first into the first with room."""
    line_of, used = np.zeros(len(lens), np.int64), []
    for row in np.argsort(-np.asarray(lens), kind="stable"):
        n = int(lens[row])
        line = next((i for i, u in enumerate(used) if u + n <= width), len(used))
        if line == len(used):
            used.append(0)
        used[line] += n
        line_of[row] = line
    return line_of


def packed_lines(lens: Sequence[int], t: int) -> int:
    """Lines of 2t slots `sample_prompts` packs a [B, t] batch into; 0 when it gains nothing.

    The count is rounded up to a multiple of B/8 (a few programs per bucket) and must stay
    under B/2: as many lines as that compute as many slots as the padded rows.
    """
    b, step = len(lens), max(1, len(lens) // 8)
    lines = -(-(int(_first_fit(lens, 2 * t).max(initial=-1)) + 1) // step) * step
    return lines if 2 * lines < b else 0


def pack_rows(lens: Sequence[int], t: int, lines: int) -> np.ndarray:
    """The rows of a left-padded [B, t] batch (real lengths `lens`) packed into lines of 2t.

    Returns int32 [lines, 2t] for `models.prefill(pack_GW=...)`: the flat index into the
    [B, t] batch of the token each slot holds, -1 for empty slots. Each row's tokens stay
    contiguous and in order inside one line (first-fit decreasing).
    """
    lens = np.asarray(lens, np.int64)
    if len(lens) and (lens.min() < 1 or lens.max() > t):
        raise ValueError(f"row lengths must be in 1..{t}; got {lens.min()}..{lens.max()}")
    line_of = _first_fit(lens, 2 * t)
    if len(lens) and line_of.max() >= lines:
        raise ValueError(f"{len(lens)} rows need {line_of.max() + 1} lines; got {lines}")
    out, used = np.full((lines, 2 * t), -1, np.int32), np.zeros(lines, np.int64)
    for row in np.argsort(-lens, kind="stable"):
        line, n = line_of[row], lens[row]
        out[line, used[line] : used[line] + n] = row * t + np.arange(t - n, t)
        used[line] += n
    return out


def common_prefix(prompts: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The longest prefix every prompt starts with, one token short of the shortest prompt.

    Chat prompts share their template's opening (system turn, user header): `sample_prompts`
    computes its keys and values once instead of once per row. Pass the prefix of the whole
    prompt set, fixed for a run, so a prompt's samples do not depend on its batch.
    """
    if not prompts:
        return ()
    first = np.asarray(prompts[0])
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        same = first[:n] == np.asarray(p[:n])
        n = int(np.argmin(same)) if not same.all() else n
    return tuple(int(x) for x in first[: max(n, 0)])


def kv_cache_bytes(config: ModelConfig, rows: int, max_len: int, dtype: str = "float32") -> int:
    """Bytes of the key/value cache `generate` preallocates for `rows` sequences."""
    slots = cache_slots(config, max_len)
    per_slot = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return rows * slots * (per_slot * jnp.dtype(dtype).itemsize + 4)  # + int32 slot positions


@dataclasses.dataclass
class Generation:
    """Host (NumPy) results in the caller's prompt order, with the cost accounting."""

    tokens: np.ndarray  # [N, S, max_new_tokens] int32
    lengths: np.ndarray  # [N, S] int32
    finished: np.ndarray  # [N, S] bool
    logps: np.ndarray  # [N, S, max_new_tokens] float32
    tokens_generated: int
    max_cache_bytes: int
    shapes: set[tuple[int, int, int]]  # the (batch, prompt length, packed lines) run
    compile_seconds: float = 0.0  # of the wall time, spent getting programs ready (the caller's)

    def first(self, k: int) -> Generation:
        """The first k responses of each prompt (the cost accounting unchanged)."""
        return dataclasses.replace(self, tokens=self.tokens[:, :k], lengths=self.lengths[:, :k],
                                   finished=self.finished[:, :k], logps=self.logps[:, :k])


def sample_prompts(
    params,
    prompts: Sequence[Sequence[int]],
    prompt_ids: Sequence[int],
    *,
    config: ModelConfig,
    opts: SamplingOptions,
    seed: int,
    iteration: int,
    batch_size: int,
    max_prompt_len: int,
    dtype: str = "float32",
    shared_prefix: Sequence[int] = (),
    pack: bool = True,
    on_batch: Callable[[int], None] | None = None,
    device_put: Callable = jax.device_put,
    device_get: Callable = jax.device_get,
) -> Generation:
    """Samples `opts.num_samples` responses for every prompt (token id lists).

    Prompts are sorted by length and cut into batches padded to a few bucket shapes (powers
    of two rows; lengths 16, 24, 32, 48, ...), so a long run compiles a handful of programs.
    `prompt_ids` seed each prompt's draws, so the result for a prompt does not depend on
    which prompts are sampled with it. `shared_prefix` (see `common_prefix`), which every
    prompt must start with, is computed once per batch instead of once per row. `pack`
    prefills a batch's prompts packed into fewer, longer lines where that computes fewer
    padding slots (`packed_lines`). A sliding-window model whose window is shorter than
    prefix, prompt and response together gets whole, unpacked prompts instead. `device_put`
    places each batch's arrays and `device_get` fetches the samples (a mesh, several hosts).
    """
    if len(prompts) != len(prompt_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_ids)} prompt ids")
    lens = np.array([len(p) for p in prompts], np.int64)
    if len(prompts) and (lens.min() == 0 or lens.max() > max_prompt_len):
        bad = int(np.argmax((lens == 0) | (lens > max_prompt_len)))
        raise ValueError(f"prompt {bad} has {lens[bad]} tokens; allowed 1..{max_prompt_len}")
    n, budget = opts.num_samples, opts.max_new_tokens
    p, prefix = len(shared_prefix), [int(x) for x in shared_prefix]
    for i, prompt in enumerate(prompts):
        if p and (len(prompt) <= p or [int(x) for x in prompt[:p]] != prefix):
            raise ValueError(
                f"prompt {i} does not continue the shared prefix of {p} tokens "
                "(every prompt must start with it and be longer)"
            )
    if cache_slots(config, max_prompt_len + budget) < max_prompt_len + budget:
        p, pack = 0, False  # a ring buffer would evict the prefix and packed rows (prefill)
    prefix = np.asarray(prefix[:p], np.int32)
    lens -= p
    out = Generation(
        tokens=np.full((len(prompts), n, budget), opts.pad_id, np.int32),
        lengths=np.zeros((len(prompts), n), np.int32),
        finished=np.zeros((len(prompts), n), bool),
        logps=np.zeros((len(prompts), n, budget), np.float32),
        tokens_generated=0,
        max_cache_bytes=0,
        shapes=set(),
    )
    batch_sizes = length_buckets(batch_size, smallest=1)
    prompt_lens = prompt_buckets(max_prompt_len - p)
    order = np.argsort(lens, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        b, t = bucket(len(idx), batch_sizes), bucket(int(lens[idx].max()), prompt_lens)
        tokens = np.full((b, t), opts.pad_id, np.int32)
        mask = np.zeros((b, t), np.int32)
        ids = np.zeros((b,), np.int32)
        for row, i in enumerate(idx):  # left padding
            tokens[row, t - lens[i] :] = prompts[i][p:]
            mask[row, t - lens[i] :] = 1
            ids[row] = prompt_ids[i]
        mask[len(idx) :, -1] = 1  # filler rows: one real token keeps them well defined
        own = mask.sum(axis=1)
        lines = packed_lines(own, t) if pack else 0
        res = device_get(
            generate(
                params,
                device_put(tokens),
                device_put(mask),
                device_put(ids),
                seed,
                iteration,
                prefix if p else None,  # replicated
                device_put(pack_rows(own, t, lines)) if lines else None,
                config=config,
                opts=opts,
                dtype=dtype,
            )
        )
        k = len(idx)
        out.tokens[idx], out.lengths[idx] = res.tokens_BSY[:k], res.lengths_BS[:k]
        out.finished[idx], out.logps[idx] = res.finished_BS[:k], res.logps_BSY[:k]
        out.tokens_generated += int(res.lengths_BS[:k].sum())
        out.max_cache_bytes = max(
            out.max_cache_bytes, kv_cache_bytes(config, b * n, p + t + budget, dtype)
        )
        out.shapes.add((b, t, lines))
        if on_batch is not None:
            on_batch(k)
    return out

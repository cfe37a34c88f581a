"""Host-side packing of laid-out responses (NumPy only; `train.pack`): padding-free lines in
which each prompt appears once, followed by its responses (prefix sharing).

A segment is [prompt | response 1 | ... | response S] for one prompt; each response sees the
prompt and itself only, at positions continuing from the prompt, so its logps are those of the
row [prompt | response] (`models.forward_packed`). A response's last token is never an input
(it predicts nothing); its first token is predicted at the prompt's last slot. Segments go
into lines by first-fit decreasing; a batch's line count is rounded up to a multiple of the
devices its batch axis is split over. The line length is the bucket (`LINE_BUCKETS`) that
costs least: G * W slots of linear layers plus G * W * W attention pairs, weighed by
`key_cost` (attention work per key relative to a token's, `key_cost(config)`). Buckets, and
the preference for a shape compiled before (`choose_line(compiled=...)`), keep the shapes,
each compiled once, to a few per run.
"""

from __future__ import annotations

import jax
import numpy as np

from optune_jax.batch import PackedRows, PairBatch

LINE_MULTIPLE = 16
# a shape compiled before is reused while it costs at most this much more than the best one
# (a compilation costs seconds; SmolLM2's train step, about 4 s on 2 cores)
COMPILED_SLACK = 1.3
# line lengths: steps of 32 to 512, of 64 to 1024, then about sqrt(2) apart
LINE_BUCKETS = (*range(32, 512, 32), *range(512, 1025, 64), 1536, 2048, 3072, 4096, 6144, 8192)


def key_cost(config) -> float:
    """Attention work per (query, key) pair over a token's work in the layers' projections:
    4 * N * H (scores and values) against 2 * (q, k, v, o and MLP weights), doubled: the
    float32 softmax and its backward run at memory speed. (SmolLM2-135M, XLA:CPU: 6.5e-4;
    forwards alone measured 3.6e-4 in lines of 320-640, more beyond; the train step's lines
    of 576 ran at 38 % of the matmul rate against 58 % for lines of 320.)"""
    n_h = config.num_attention_heads * config.head_dim
    kv_h = config.num_key_value_heads * config.head_dim
    d, f = config.hidden_size, config.intermediate_size
    per_token = 2 * (2 * d * n_h + 2 * d * kv_h + 3 * d * f)
    return 2 * 4 * n_h / per_token


def longest_line(prompt_len: int, response_len: int, branches: int) -> int:
    """The bucket of the longest segment: a prompt of `prompt_len` and `branches` responses of
    `response_len` tokens (the dry run's worst case)."""
    need = prompt_len + branches * max(response_len - 1, 0)
    return next((b for b in LINE_BUCKETS if b >= need), -(-need // LINE_MULTIPLE) * LINE_MULTIPLE)


def choose_line(
    sizes_per_batch: list[list[int]],
    *,
    shards: int,
    key_cost: float,
    compiled: set | None = None,
    slack: float = COMPILED_SLACK,
) -> tuple[int, int]:
    """(lines G, width W) that hold every batch's segments at the least cost (module doc).

    `compiled`: the (G, W) shapes compiled so far; the cheapest of them that holds the
    segments is taken when it costs at most `slack` times the best, and the choice is added.
    """
    longest = max((max(x, default=1) for x in sizes_per_batch), default=1)
    total = max((sum(x) for x in sizes_per_batch), default=1)
    cost = lambda g, w: g * w * (1 + key_cost * w)
    best = None
    for width in (b for b in LINE_BUCKETS if b >= longest):
        lines = max(count_lines(x, width, shards) for x in sizes_per_batch)
        if best is None or cost(lines, width) < cost(*best):
            best = (lines, width)
        if width >= total:
            break
    if best is None:  # longer than every bucket: its own length
        width = -(-longest // LINE_MULTIPLE) * LINE_MULTIPLE
        best = (max(count_lines(x, width, shards) for x in sizes_per_batch), width)
    if compiled is not None:
        fits = [
            (g, w)
            for g, w in compiled
            if w >= longest and all(count_lines(x, w, shards) <= g for x in sizes_per_batch)
        ]
        reuse = min(fits, key=lambda gw: cost(*gw), default=None)
        if reuse is not None and cost(*reuse) <= slack * cost(*best):
            best = reuse
        compiled.add(best)
    return best


def _segments(tokens_NST, attn_NST, resp_NST, keep_NS, prompt_len: int):
    """[(row n, prompt ids, [(branch b, response ids)])] of the rows with a kept response."""
    out = []
    for n in range(tokens_NST.shape[0]):
        kept = np.flatnonzero(keep_NS[n])
        if not len(kept):
            continue
        prompt = tokens_NST[n, kept[0], :prompt_len][attn_NST[n, kept[0], :prompt_len] == 1]
        branches = []
        for b in kept:
            if not np.array_equal(
                tokens_NST[n, b, :prompt_len][attn_NST[n, b, :prompt_len] == 1], prompt
            ):
                raise ValueError(f"row {n}: responses {kept[0]} and {b} follow different prompts")
            branches.append((b, tokens_NST[n, b, prompt_len:][resp_NST[n, b, prompt_len:] == 1]))
        if not len(prompt) and any(len(r) for _, r in branches):
            raise ValueError(f"row {n}: a response without a prompt has no slot to start from")
        out.append((n, prompt, branches))
    return out


def _size(segment) -> int:
    _, prompt, branches = segment
    return len(prompt) + sum(max(len(r) - 1, 0) for _, r in branches)


def _first_fit(sizes: list[int], line_len: int) -> list[int]:
    """The line of each segment: first fit, longest first (ties in order)."""
    free: list[int] = []
    line = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if sizes[i] > line_len:
            raise ValueError(f"a segment of {sizes[i]} tokens exceeds the line of {line_len}")
        j = next((j for j, f in enumerate(free) if f >= sizes[i]), len(free))
        if j == len(free):
            free.append(line_len)
        free[j] -= sizes[i]
        line[i] = j
    return line


def _fill(segments, lines: int, line_len: int, num_targets: int, branches: int) -> PackedRows:
    shape = (lines, line_len)
    tokens, pos, branch = (np.zeros(shape, np.int32) for _ in range(3))
    segment = np.full(shape, -1, np.int32)
    at, target, seq = (np.zeros(num_targets, np.int32) for _ in range(3))
    seq[:] = -1
    used, r = [0] * lines, 0
    for (n, prompt, resps), j in zip(
        segments, _first_fit([_size(s) for s in segments], line_len), strict=True
    ):
        start = used[j]
        p = len(prompt)
        tokens[j, start : start + p], pos[j, start : start + p] = prompt, np.arange(p)
        segment[j, start : start + p] = n
        last, cur = j * line_len + start + p - 1, start + p  # the prompt's last slot
        for b, resp in resps:
            k = len(resp)
            if not k:  # an empty response: logp 0
                continue
            ins = slice(cur, cur + k - 1)
            tokens[j, ins], pos[j, ins] = resp[:-1], np.arange(p, p + k - 1)
            segment[j, ins], branch[j, ins] = n, b + 1
            at[r : r + k] = np.concatenate([[last], j * line_len + np.arange(cur, cur + k - 1)])
            target[r : r + k], seq[r : r + k] = resp, n * branches + b
            r, cur = r + k, cur + k - 1
        used[j] = cur
    return PackedRows(tokens, pos, segment, branch, at, target, seq)


def pack_rows(
    tokens_NST,
    attn_NST,
    resp_NST,
    *,
    prompt_len: int,
    keep_NS=None,
    line_len: int | None = None,
    shards: int = 1,
    key_cost: float = 0.0,
    compiled: set | None = None,
) -> PackedRows:
    """S responses to each of N prompts, laid out as rows (`optune_jax.pair_rows.layout`), packed:
    `PackedRows` [G, W] with J = N * S * Y targets. `keep_NS` (default all) leaves responses
    out (their logps come out 0). Lines of `line_len`, or of the length `choose_line` finds;
    G and J are rounded up to multiples of `shards`."""
    n, s, t = tokens_NST.shape
    keep_NS = np.ones((n, s), bool) if keep_NS is None else np.asarray(keep_NS, bool)
    segs = _segments(tokens_NST, attn_NST, resp_NST, keep_NS, prompt_len)
    sizes = [_size(x) for x in segs]
    if line_len is None:
        lines, line_len = choose_line(
            [sizes], shards=shards, key_cost=key_cost, compiled=compiled
        )
    else:
        lines = count_lines(sizes, line_len, shards)
    targets = -(-n * s * (t - prompt_len) // shards) * shards
    return _fill(segs, lines, line_len, targets, s)


def count_lines(sizes: list[int], line_len: int, shards: int = 1) -> int:
    """Lines first fit needs for segments of `sizes`, rounded up to a multiple of `shards`."""
    need = max(_first_fit(sizes, line_len), default=-1) + 1
    return max(-(-need // shards), 1) * shards


def _rows(batch: PairBatch):
    """(tokens, attn, resp, keep) [*B, 2 (+ S), T]: the pairs and HyPO's samples as responses
    of one prompt each."""
    keep = np.repeat(np.asarray(batch.pair_mask, bool)[..., None], 2, axis=-1)
    rows = [batch.tokens, batch.attn, batch.resp]
    if batch.samples is not None:
        smp = batch.samples
        more = (smp.tokens, smp.attn, smp.resp)
        rows = [np.concatenate([a, b], axis=-2) for a, b in zip(rows, more, strict=True)]
        s = smp.tokens.shape[-2]
        keep = np.concatenate([keep, np.repeat(np.asarray(smp.mask, bool)[..., None], s, -1)], -1)
    return (*rows, keep)


def pack_batch(
    batch: PairBatch,
    *,
    prompt_len: int,
    line_len: int | None = None,
    shards: int = 1,
    key_cost: float = 0.0,
    compiled: set | None = None,
) -> PairBatch:
    """A host batch [A, M] with its rows (pairs, then HyPO's samples of the same prompt) packed
    into `PackedRows` [A, G, W] (one G and W for all A micro-batches; W `line_len` or chosen
    as in `pack_rows`); the row fields become None.
    Masked pairs (and samples) are left out: the loss never counts their logps."""
    tokens, attn, resp, keep = _rows(batch)
    a, m, s, t = tokens.shape
    segs = [_segments(tokens[i], attn[i], resp[i], keep[i], prompt_len) for i in range(a)]
    sizes = [[_size(x) for x in seg] for seg in segs]
    if line_len is None:
        lines, line_len = choose_line(
            sizes, shards=shards, key_cost=key_cost, compiled=compiled
        )
    else:
        lines = max(count_lines(x, line_len, shards) for x in sizes)
    parts = [_fill(seg, lines, line_len, m * s * (t - prompt_len), s) for seg in segs]
    packed = jax.tree.map(lambda *x: np.stack(x), *parts)
    samples = batch.samples
    if samples is not None:
        samples = samples.replace(tokens=None, attn=None, resp=None)
    return batch.replace(tokens=None, attn=None, resp=None, samples=samples, packed=packed)

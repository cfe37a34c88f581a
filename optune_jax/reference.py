"""Phase: sequence logps of laid-out rows under a reference policy (design §3), in fixed chunks."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from optune_jax import sharding
from optune_jax.packing import key_cost, pack_rows
from optune_jax.run import distributed
from optune_jax.train_step import PolicySpec, packed_logps, response_logps


class ReferenceLogps:
    """Jitted `response_logps` over rows [N, S, T] in chunks of `rows` (one compiled program);
    with `pack`, the rows of each chunk packed (`optune_jax.packing`; one program per line
    count and S).

    Shardings follow the (sharded) parameters; logps come back to every host. Parameters
    waiting on the host (π_0) are put on the devices like `param_shardings` first.
    """

    def __init__(
        self, spec: PolicySpec, *, prompt_len: int, layout: sharding.Layout, param_shardings,
        rows: int, pack: bool = False,
    ):
        def compiled(spec):
            if pack:
                fn = functools.partial(packed_logps, policy=spec)
            else:
                fn = functools.partial(response_logps, policy=spec, prompt_len=prompt_len)
            return jax.jit(
                sharding.with_rules(fn, layout),
                out_shardings=sharding.replicated(layout.mesh),
                static_argnames=("num_seqs",) if pack else (),
            )

        self._mean_or_sum = compiled(spec)  # as the loss takes them
        summed = dataclasses.replace(spec, average_logps=False)
        self._sum = self._mean_or_sum if summed == spec else compiled(summed)
        self.param_shardings, self.rows, self.pack = param_shardings, rows, pack
        self.prompt_len, self.key_cost = prompt_len, key_cost(spec.config)
        self.compiled: dict[int, set] = {}  # S -> the (lines, width) shapes compiled so far
        self._rows_sharding = sharding.batch_sharding(layout, rows)

    def __call__(self, params, tokens_NST, attn_NST, resp_NST, *, summed: bool = False):
        """float32 [N, S]: per-token means or sums as the loss takes them (`summed`: sums,
        whatever the loss averages, for the drift metrics)."""
        fn = self._sum if summed else self._mean_or_sum
        if not isinstance(jax.tree.leaves(params)[0], jax.Array):  # π_0 from the host
            params = distributed.put(params, self.param_shardings)
        n, s = tokens_NST.shape[:2]
        if self.pack:
            return self._packed(fn, params, tokens_NST, attn_NST, resp_NST)
        flat = [x.reshape(n * s, x.shape[-1]) for x in (tokens_NST, attn_NST, resp_NST)]
        rows = self.rows
        out = np.zeros((n * s,), np.float32)
        for start in range(0, n * s, rows):
            chunk = [x[start : start + rows] for x in flat]
            m = len(chunk[0])
            if m < rows:
                chunk = [np.concatenate([x, np.repeat(x[:1], rows - m, 0)]) for x in chunk]
            chunk = distributed.put(chunk, self._rows_sharding)
            out[start : start + m] = np.asarray(fn(params, *chunk))[:m]
        return out.reshape(n, s)

    def _packed(self, fn, params, tokens_NST, attn_NST, resp_NST):
        """Chunks of `rows` responses (rows // S prompts), each packed; filler rows left out."""
        n, s = tokens_NST.shape[:2]
        prompts = max(self.rows // s, 1)
        shards = sharding.split_count(self._rows_sharding, 0)
        out = np.zeros((n, s), np.float32)
        for start in range(0, n, prompts):
            chunk = [x[start : start + prompts] for x in (tokens_NST, attn_NST, resp_NST)]
            m = len(chunk[0])
            keep = np.arange(prompts)[:, None] < np.full((1, s), m)
            if m < prompts:
                chunk = [np.concatenate([x, np.repeat(x[:1], prompts - m, 0)]) for x in chunk]
            packed = pack_rows(
                *chunk, prompt_len=self.prompt_len, keep_NS=keep, shards=shards,
                key_cost=self.key_cost, compiled=self.compiled.setdefault(s, set()),
            )
            packed = distributed.put(packed, self._rows_sharding)
            logps = np.asarray(fn(params, packed, num_seqs=prompts * s))
            out[start : start + m] = logps.reshape(prompts, s)[:m]
        return out

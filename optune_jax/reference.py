"""Phase: sequence logps of laid-out rows under a reference policy (SPEC §3), in fixed chunks."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from optune_jax import distributed, sharding
from optune_jax.train_step import PolicySpec, response_logps


class ReferenceLogps:
    """Jitted `response_logps` over rows [N, S, T] in chunks of `rows` (one compiled program).

    Shardings follow the (sharded) parameters; logps come back to every host. Parameters
    waiting on the host (π_0) are put on the devices like `param_shardings` first.
    """

    def __init__(self, spec: PolicySpec, *, prompt_len: int, mesh, rules, param_shardings, rows):
        def compiled(spec):
            fn = functools.partial(response_logps, policy=spec, prompt_len=prompt_len)
            return jax.jit(
                sharding.with_rules(fn, mesh, rules), out_shardings=sharding.replicated(mesh)
            )

        self._mean_or_sum = compiled(spec)  # as the loss takes them
        summed = dataclasses.replace(spec, average_logps=False)
        self._sum = self._mean_or_sum if summed == spec else compiled(summed)
        self.param_shardings, self.rows = param_shardings, rows
        self._rows_sharding = sharding.batch_sharding(mesh, rules, rows)

    def __call__(self, params, tokens_NST, attn_NST, resp_NST, *, summed: bool = False):
        """float32 [N, S]: per-token means or sums as the loss takes them (`summed`: sums,
        whatever the loss averages, for the drift metrics)."""
        fn = self._sum if summed else self._mean_or_sum
        if not isinstance(jax.tree.leaves(params)[0], jax.Array):  # π_0 from the host
            params = distributed.put(params, self.param_shardings)
        n, s = tokens_NST.shape[:2]
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

"""Optimizer steps over a stream of batches, with their metrics summed on the host (both trainers).

Step N's metrics are fetched after step N+1 is dispatched, so the host never waits on the
device between steps. A non-finite step leaves the state as it was (`accumulated_step`); the
guard counts it and stops a run of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
from tqdm.auto import tqdm

from optune_jax.run import distributed, signals
from optune_jax.run.guard import NonFiniteGuard

KL_METRICS = ("kl", "kl_surrogate")  # HyPO metrics: means over sampled prompts, not pairs
COUNTS = ("num_pairs", "num_prompts", "grad_norm")  # summed as they are


@dataclasses.dataclass
class StepSums:
    """Per-step metrics summed over an iteration or epoch, means weighted like the loss."""

    sums: dict = dataclasses.field(default_factory=dict)
    steps: int = 0
    skipped: int = 0

    def add(self, metrics: dict) -> None:
        for key, value in metrics.items():
            if key in COUNTS:
                w = 1.0
            else:  # means over pairs (or, for the KL term, over sampled prompts)
                w = float(metrics["num_prompts" if key in KL_METRICS else "num_pairs"])
            self.sums[key] = self.sums.get(key, 0.0) + w * float(value)

    def means(self, keep: tuple[str, ...] | None = None) -> dict:
        """Means of the counted steps' metrics (only `keep`, in that order, if given), and
        steps, skipped_steps, pairs_trained and the mean gradient norm (NaN when no step
        counted: null in metrics.jsonl)."""
        s = self.sums
        pairs, prompts = max(s.get("num_pairs", 0.0), 1.0), max(s.get("num_prompts", 0.0), 1.0)
        keys = keep if keep is not None else [k for k in s if k not in COUNTS]
        out = {k: s[k] / (prompts if k in KL_METRICS else pairs) for k in keys if k in s}
        counted = self.steps - self.skipped
        out["steps"] = self.steps
        out["skipped_steps"] = self.skipped  # non-finite: the state was left as it was
        out["pairs_trained"] = s.get("num_pairs", 0.0)
        out["grad_norm"] = s["grad_norm"] / counted if counted else float("nan")
        return out


def run_steps(
    step: Callable,
    state,
    batches: Iterable,
    *,
    frozen=None,
    sharding,
    guard: NonFiniteGuard,
    where: str,
    total: int,
    desc: str,
    progress: bool,
    before_step: Callable | None = None,
):
    """Runs `step(state, batch, frozen)` over `batches`: (pair indices, host batch) items, put
    on the devices with `sharding`; `before_step(idx, batch, state, n)` may complete a batch
    with the current state before step n (from 0).

    Returns (state, StepSums, the first step's metrics on the host or {}). `where` names the
    phase in the guard's message ("iteration 2" -> "iteration 2, step 5 of 12").
    """
    sums, pending, first = StepSums(), None, None

    def fetch(metrics, n: int) -> None:  # counted, or skipped as non-finite
        metrics = jax.device_get(metrics)
        if guard.counts(metrics, where=f"{where}, step {n} of {total}"):
            sums.add({key: v for key, v in metrics.items() if key != "skipped"})
        else:
            sums.skipped += 1

    with tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for idx, batch in batches:
            if before_step is not None:
                batch = before_step(idx, batch, state, sums.steps)
            signals.check()  # a stop between steps (its raise may have landed in a callback)
            batch = distributed.put(batch, sharding)
            state, metrics = step(state, batch, frozen)
            if pending is not None:  # step N's metrics once step N+1 is dispatched
                fetch(pending, sums.steps)
            pending, sums.steps = metrics, sums.steps + 1
            first = metrics if first is None else first
            bar.update()
        if pending is not None:
            fetch(pending, sums.steps)
    return state, sums, jax.device_get(first) if first is not None else {}

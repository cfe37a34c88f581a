"""Seconds JAX spends getting programs ready (tracing, lowering, compiling or loading them from the
persistent cache), from `jax.monitoring`'s events: what a phase's wall time owes to compilation,
so generation seconds can be reported with compile apart (design §9)."""

from __future__ import annotations

import threading

from jax import monitoring

# trace, lower to MLIR, compile (a persistent-cache hit is timed inside the compile event)
_PREFIX = "/jax/core/compile/"
_lock = threading.Lock()
_state = {"seconds": 0.0, "listening": False}


def _listen(event: str, seconds: float, **_) -> None:
    if event.startswith(_PREFIX):
        with _lock:
            _state["seconds"] += seconds


def total() -> float:
    """Compile seconds in this process since the first call (which starts the count)."""
    with _lock:
        if not _state["listening"]:
            monitoring.register_event_duration_secs_listener(_listen)
            _state["listening"] = True
        return _state["seconds"]


class CompileClock:
    """`with CompileClock() as c: ...`, then `c.seconds`: compile seconds inside the block."""

    def __enter__(self) -> CompileClock:
        self.seconds, self._start = 0.0, total()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = total() - self._start

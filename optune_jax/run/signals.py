"""SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice before it kills) as a clean stop.

    with signals.stop_on_signals():     # the command line, around the whole run
        ...                             # a signal raises Interrupted here, abandoning the step
        signals.check()                 # between steps: raised again if it was swallowed
        with signals.deferred():        # a checkpoint and its metrics line: finished first
            save()

`Interrupted` is a BaseException, like KeyboardInterrupt: no `except Exception` (a checkpoint
restore that marks unreadable steps as damaged, say) mistakes it for a failure of its own.
"""

from __future__ import annotations

import contextlib
import signal
import threading

STOPPING = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run was asked to stop by a signal; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum


_state = threading.local()


def _depth() -> int:
    return getattr(_state, "depth", 0)


def _handler(signum, frame) -> None:
    # kept until the block ends: a raise that lands in a callback whose exceptions Python
    # swallows (XLA's gc callback) is raised again at the next `check`
    _state.received = signum
    if _depth() > 0:  # inside `deferred`: raised when the block ends
        _state.pending = getattr(_state, "pending", None) or signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise `Interrupted` in the main thread while the block runs (outside
    `deferred` blocks); the previous handlers are back afterwards. A no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.received = None
    old = {s: signal.signal(s, _handler) for s in STOPPING}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _state.pending = _state.received = None


def check() -> None:
    """Raises `Interrupted` for a signal already received (outside `deferred`): the loops call
    it between steps, so a raise that was swallowed where it landed still stops the run."""
    signum = getattr(_state, "received", None)
    if signum is not None and _depth() == 0:
        raise Interrupted(signum)


@contextlib.contextmanager
def deferred():
    """A block that a stopping signal does not cut short: it is raised when the block ends."""
    _state.depth = _depth() + 1
    try:
        yield
    finally:
        _state.depth -= 1
    pending = getattr(_state, "pending", None)  # (a block that raised keeps its own error)
    if _state.depth == 0 and pending is not None:
        _state.pending = None
        raise Interrupted(pending)

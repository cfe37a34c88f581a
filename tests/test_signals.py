"""signals: SIGINT and SIGTERM raise Interrupted, except inside `deferred` blocks, which finish
first; the handlers are restored afterwards."""

import os
import signal

import pytest

from optune_jax.run import signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_raises_interrupted_with_the_shells_exit_code(sig):
    before = signal.getsignal(sig)
    with pytest.raises(signals.Interrupted) as info, signals.stop_on_signals():
        os.kill(os.getpid(), sig)
        signal.sigtimedwait([], 0)  # let the handler run
        raise AssertionError("not interrupted")
    assert info.value.exit_code == 128 + sig and info.value.name == signal.Signals(sig).name
    assert not isinstance(info.value, Exception)  # `except Exception` does not swallow it
    assert signal.getsignal(sig) == before


def test_a_deferred_block_finishes_before_the_stop():
    done = []
    with pytest.raises(signals.Interrupted), signals.stop_on_signals():
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0)
            done.append("line")
            with signals.deferred():  # nested: the outer block still finishes
                done.append("checkpoint")
            done.append("after")
        done.append("never")
    assert done == ["line", "checkpoint", "after"]


def test_a_deferred_block_that_fails_keeps_its_own_error():
    with pytest.raises(ValueError, match="disk"), signals.stop_on_signals():
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0)
            raise ValueError("disk")


def test_a_stop_swallowed_where_it_landed_is_raised_at_the_next_check():
    """A raise caught by a callback (XLA's gc callback swallows exceptions) is not lost: the
    next `check` between steps raises it; none is pending before a signal or after the block."""
    with signals.stop_on_signals():
        signals.check()  # nothing received yet
    with pytest.raises(signals.Interrupted) as info, signals.stop_on_signals():
        try:  # as a callback whose exceptions Python ignores
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0)
        except signals.Interrupted:
            pass
        with signals.deferred():
            signals.check()  # a checkpoint under way is not cut short
        signals.check()
        raise AssertionError("the stop was lost")
    assert info.value.exit_code == 128 + signal.SIGTERM
    with signals.stop_on_signals():
        signals.check()  # the next run starts clean

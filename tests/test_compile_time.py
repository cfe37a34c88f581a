"""CompileClock: the seconds JAX spends getting programs ready, apart from running them."""

import jax
import jax.numpy as jnp

from optune_jax.run.compile_time import CompileClock, total


def test_a_new_program_counts_compile_seconds_and_a_compiled_one_none():
    f = jax.jit(lambda x: jnp.tanh(x) @ x.T + 7.25)  # a program no other test compiles
    x = jnp.ones((64, 64))
    with CompileClock() as first:
        f(x).block_until_ready()
    with CompileClock() as again:
        for _ in range(3):
            f(x).block_until_ready()
    assert first.seconds > 0
    assert again.seconds == 0.0
    with CompileClock() as other_shape:  # a new shape is a new program
        f(jnp.ones((32, 64))).block_until_ready()
    assert other_shape.seconds > 0
    assert total() >= first.seconds + other_shape.seconds


def test_nested_clocks_each_count_their_own_block():
    g = jax.jit(lambda x: jnp.cos(x) * 3.5)
    with CompileClock() as outer:
        with CompileClock() as inner:
            g(jnp.ones(5)).block_until_ready()
        g(jnp.ones(6)).block_until_ready()
    assert 0 < inner.seconds < outer.seconds

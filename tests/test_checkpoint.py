"""Checkpoints: damaged steps are found, named and set aside; a failed save is one line."""

import errno

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from optune_jax.run.checkpoint import FILES, Checkpoints
from optune_jax.run.errors import RunError

HOST = {"x": np.arange(5)}


def state(step: int) -> dict:
    return {"w": jnp.arange(1000, dtype=jnp.float32).reshape(10, 100) + step, "b": jnp.ones(3)}


@pytest.fixture
def saved(tmp_path):
    """Steps 0, 1, 2 in tmp_path/checkpoints."""
    ckpt = Checkpoints(tmp_path / "checkpoints", keep=3)
    for step in range(3):
        ckpt.save(step, state=state(step), host=HOST, meta={"step": step})
    ckpt.close()
    return tmp_path / "checkpoints"


def _largest_file(directory):
    return max((f for f in directory.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def _restore(directory):
    ckpt = Checkpoints(directory, keep=3)
    return ckpt, ckpt.restore_newest(state_like=state(0), host_like=HOST)


def test_truncated_and_incomplete_checkpoints_are_skipped_named_and_set_aside(saved):
    # issue 20, case 2: an array file cut short in the newest step, and orbax's _METADATA and
    # commit marker removed from the one before
    big = _largest_file(saved / "2" / "state")
    size = big.stat().st_size
    big.write_bytes(big.read_bytes()[: size // 2])
    (saved / "1" / "state" / "_METADATA").unlink()
    (saved / "1" / "commit_success.txt").unlink()
    ckpt, found = _restore(saved)
    assert found.step == 0 and found.meta == {"step": 0}
    np.testing.assert_array_equal(found.state["w"], state(0)["w"])
    rel = big.relative_to(saved / "2")
    assert found.note == (
        f"checkpoint 2 is damaged: {rel} has {size // 2} of its {size} bytes; checkpoint 1 is "
        "damaged: commit_success.txt is missing (moved to checkpoints.damaged/); "
        "resuming from checkpoint 0"
    )
    assert [d for s, d in found.damaged] == [f"{rel} has {size // 2} of its {size} bytes",
                                             "commit_success.txt is missing"]
    assert sorted(p.name for p in (saved.parent / "checkpoints.damaged").iterdir()) == ["1", "2"]
    assert ckpt.latest() == 0
    ckpt.save(1, state=state(1), host=HOST, meta={"step": 1})  # the step can be saved again
    assert ckpt.latest() == 1 and ckpt.problem(1) is None
    ckpt.close()


def test_a_file_of_the_right_size_that_does_not_read_back(saved):
    big = _largest_file(saved / "2" / "state")
    big.write_bytes(b"\0" * big.stat().st_size)  # the sizes match; the contents do not decode
    ckpt, found = _restore(saved)
    assert found.step == 1
    assert found.note.startswith("checkpoint 2 is damaged: it cannot be read (")
    assert found.note.endswith("(moved to checkpoints.damaged/); resuming from checkpoint 1")
    assert "\n" not in found.note
    ckpt.close()


def test_without_a_file_list_orbax_files_are_checked(saved):
    # a step saved by an older version, or a save stopped after orbax but before the list
    (saved / "2" / FILES).unlink()
    ckpt = Checkpoints(saved, keep=3)
    assert ckpt.problem(2) is None
    (saved / "2" / "host" / "_METADATA").unlink()
    assert ckpt.problem(2) == "host/_METADATA is missing"
    ckpt.close()


def test_no_good_checkpoint_starts_afresh(saved):
    for step in range(3):
        (saved / str(step) / "meta" / "metadata").unlink()
    ckpt, found = _restore(saved)
    assert found.step is None and found.state is None
    assert found.note.endswith("(moved to checkpoints.damaged/); starting afresh")
    assert ckpt.latest() is None
    ckpt.close()


def test_a_failed_save_is_one_line_and_the_next_run_saves_that_step(saved, monkeypatch):
    async def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(saved))

    ckpt = Checkpoints(saved, keep=5)
    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", no_space)
    with pytest.raises(RunError, match=f"^cannot write checkpoint {saved}/3: no space left on "
                                       "device$"):
        ckpt.save(3, state=state(3), host=HOST, meta={"step": 3})
    ckpt.close()
    monkeypatch.undo()
    ckpt, found = _restore(saved)  # the half-written step is not taken for a complete one
    assert found.step == 2 and found.note == ""
    ckpt.save(3, state=state(3), host=HOST, meta={"step": 3})
    assert ckpt.latest() == 3
    ckpt.close()

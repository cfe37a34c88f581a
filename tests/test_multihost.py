"""Two processes joined by jax.distributed over loopback train like one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from optune_jax.loop import OptuneRun
from optune_jax.run.checkpoint import Checkpoints
from optune_jax.run.config_file import load_config

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 400
# one small iteration: everything regenerated, one optimizer step, evaluation before and after
SMALL = [
    "optune.iterations=1",
    "data.num_train_prompts=8",
    "data.num_eval_prompts=4",
    "sampling.max_new_tokens=4",
    "sampling.batch_size=8",
    "train.batch_size=8",
    "train.micro_batch_size=8",
    "train.epochs=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, port: int) -> list[subprocess.Popen]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # 2 x 4 = the 8 devices below
    procs = []
    for i in range(2):
        sets = [
            *SMALL,
            f"run.output_dir={out}",
            f"distributed.coordinator=127.0.0.1:{port}",
            "distributed.num_processes=2",
            f"distributed.process_id={i}",
        ]
        argv = [
            sys.executable,
            "-m",
            "optune_jax.train",
            "--config",
            "configs/tiny.yaml",
            "--no-progress",
            *(a for s in sets for a in ("--set", s)),
        ]
        procs.append(
            subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


@pytest.mark.slow  # three runs of the tiny loop on 2 cores: about 1.5 to 3 minutes
def test_two_processes_end_with_the_parameters_of_one(tmp_path):
    two = tmp_path / "two"
    procs = _launch(two, _free_port())
    try:
        # meanwhile, the same run in one process on one device
        sets = [*SMALL, f"run.output_dir={tmp_path}/one", "mesh.fsdp=1"]
        one = OptuneRun(load_config("configs/tiny.yaml", sets), progress=False)
        assert jax.process_count() == 1 and one.layout.mesh.devices.size == 1
        one.run()
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]

    # process 0 alone wrote the shared files; the 8-way checkpoint restores onto one device
    assert (two / "model" / "model.safetensors").exists() and (two / "summary.md").exists()
    ckpt = Checkpoints(two / "checkpoints")
    state, host, _ = ckpt.restore(0, state_like=one.state, host_like=one._host_state())
    ckpt.close()
    np.testing.assert_array_equal(host["tokens"], one.source.pool.tokens_P2Y)  # same samples
    # AdamW's step is about ±lr per weight whatever the gradient's size, so the collectives'
    # summation order (gloo vs in-process) may move a weight with a near-zero gradient by up to
    # ~lr/1000; a missed gradient all-reduce would move many by ~lr (2e-2)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-4),
        jax.device_get(state.params),
        jax.device_get(one.state.params),
    )
    got, want = (
        json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])
        for d in (two, tmp_path / "one")
    )
    assert got["pairs"] == want["pairs"]
    np.testing.assert_allclose(got["train.loss"], want["train.loss"], rtol=1e-5)
    one.close()

"""Operations a user can trust: one run per directory, a full disk, SIGTERM and SIGINT, a metrics
line lost after its checkpoint, divergence, and what resume, caps and the report say. Every case
ends in one line, and where resuming makes sense the run resumes to the uninterrupted run's
parameters (the micro run of test_loop.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from optune_jax import train
from optune_jax.loop import OptuneRun
from optune_jax.run.errors import RunError
from optune_jax.study import report

from .test_loop import MICRO, ONE_DEVICE, _fails, _iterations, micro_config

CLI = [sys.executable, "-m", "optune_jax.train", "--config", "configs/tiny.yaml", "--no-progress",
       "--no-export"]


def _sets(*sets: str) -> list[str]:
    return [x for s in sets for x in ("--set", s)]


def _micro_argv(out: Path, *extra: str) -> list[str]:
    return [*CLI[3:], *_sets(*MICRO, f"run.output_dir={out}", *extra)]


def test_one_run_per_directory(tmp_path, capsys):
    """A live run holds its directory: a second run, --overwrite and --resume are refused in one
    line naming its process; once it ends, or its process dies, the directory is free."""
    out = tmp_path / "run"
    first = OptuneRun(micro_config(tmp_path, ONE_DEVICE), progress=False)
    here = f"{out} is in use by another run (process {os.getpid()} on "
    for mode in ([], ["--overwrite"], ["--resume"], ["--auto-resume"]):
        _fails(capsys, [*_micro_argv(out, ONE_DEVICE), *mode], here)
    first.close()
    # a second process holds the lock: refused; once that process is killed, the file it left
    # behind does not block
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR);"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, b'process 4242');"
         "print('held', flush=True); time.sleep(600)", str(out / ".lock")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    _fails(capsys, [*_micro_argv(out, ONE_DEVICE), "--overwrite"],
           f"{out} is in use by another run (process 4242); wait for it to end or choose another")
    holder.kill()
    holder.wait()
    assert (out / ".lock").read_text() == "process 4242"  # a stale lock file, from a dead process
    run = OptuneRun(micro_config(tmp_path, ONE_DEVICE), overwrite=True, progress=False)
    assert (out / ".lock").read_text().startswith(f"process {os.getpid()} on ")
    run.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB file system (a micro run's first checkpoint needs about 40 MiB)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small file system here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_in_one_line_and_leaves_no_partial_checkpoint(small_disk, capsys):
    out = small_disk / "run"
    assert train.main(_micro_argv(out)) == 2
    assert capsys.readouterr().err == (f"error: cannot write checkpoint {out}/checkpoints/0: no "
                                       "space left on device\n")
    left = [p.name for p in (out / "checkpoints").iterdir()]
    assert left == [], left  # orbax's temporary directory removed: --auto-resume starts over
    # (that a run with no checkpoint starts over exactly: test_loop's fault-injection test)


def test_a_signal_mid_iteration_stops_in_one_line_and_leaves_its_checkpoints(tmp_path, capsys):
    """SIGTERM (a scheduler's notice) to a real run abandons the iteration under way: the
    newest complete checkpoint stays the newest, one line says where --resume continues, the
    exit code is 128 + the signal's number. (SIGINT takes the same path: test_signals.py,
    test_cli.py.) The signal comes from another thread of this process, as from outside."""
    sig = signal.SIGTERM
    out = tmp_path / "run"
    done0 = out / "checkpoints" / "0" / "optune_files.json"

    def once_checkpoint_0_is_written():
        deadline = time.monotonic() + 300
        while not done0.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), sig)

    # while the run holds the signal its handler takes it; before or after, a no-op does (never
    # the default, which would end pytest)
    before = signal.signal(sig, lambda *_: None)
    try:
        sender = threading.Thread(target=once_checkpoint_0_is_written, daemon=True)
        sender.start()
        code = train.main(_micro_argv(out))
        sender.join(timeout=300)
    finally:
        signal.signal(sig, before)
    err = capsys.readouterr().err
    assert code == 128 + sig, err
    name = signal.Signals(sig).name
    line = re.fullmatch(rf"stopped by {name}: checkpoint (\d) in {out} is the newest; --resume "
                        r"continues from iteration (\d)\n", err)
    assert line, err
    newest, next_iteration = map(int, line.groups())
    assert next_iteration == newest + 1 and sorted(
        p.name for p in (out / "checkpoints").iterdir()) == [str(i) for i in range(newest + 1)]
    # resuming from that checkpoint ends as the uninterrupted run: test_loop's kill and fault
    # tests; the resume's own line: test_resume_says_what_it_found_and_refuses_what_is_not_there


def test_a_line_lost_after_its_checkpoint_is_written_again(uninterrupted, tmp_path, capsys):
    """The disk fills as iteration 1's line is written, yet its checkpoint completes (space freed
    between): the resume writes the line again from the checkpoint, and says so."""
    _, whole = uninterrupted
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    log = out / "metrics.jsonl"
    full = log.read_text()
    lines = full.splitlines(keepends=True)
    log.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # torn, no newline
    capsys.readouterr()
    run = OptuneRun(micro_config(tmp_path), resume=True, progress=False)
    run.run()
    run.close()
    assert log.read_text() == full
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"note: {log} had no complete line for iteration 1; written again from "
                       "the checkpoint")


def test_divergence_is_warned_and_said_in_the_summary(tmp_path, capsys):
    """Learning rate 10: everything stays finite (the non-finite guard never fires) while the
    policy collapses (here π_0 finds its greedy answers a nat per token less likely at once);
    the iteration is named in a warning, and the closing line says DIVERGED."""
    out = tmp_path / "run"
    argv = _micro_argv(out, ONE_DEVICE, "train.learning_rate=10", "eval.drift=true",
                       "optune.iterations=1")  # (it diverges in its first iteration)
    assert train.main(argv) == 0
    captured = capsys.readouterr()
    warnings = [ln for ln in captured.err.splitlines() if ln.startswith("warning:")]
    assert warnings[0].startswith("warning: iteration 0 diverged: NLL under π_0 of greedy answers")
    assert warnings[0].endswith("nats/token (rise > eval.max_nll_rise=1)")
    last = captured.out.rstrip().splitlines()[-1]
    assert last.startswith("In words: DIVERGED at iteration 0 (NLL under π_0 of greedy answers ")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["diverged"] == [warnings[0].removeprefix("warning: iteration 0 diverged: ")]
    # (with eval.divergence=false nothing is checked: tests/test_divergence.py)


def test_resume_says_what_it_found_and_refuses_what_is_not_there(tmp_path, capsys):
    typo = tmp_path / "rnu"
    _fails(capsys, [*_micro_argv(typo, ONE_DEVICE), "--resume"],
           f"error: cannot resume {typo}: it holds no run (no config.yaml); check the path")
    assert not typo.exists()  # nothing created for a typo
    # a run stopped before its first checkpoint: --resume refuses, --auto-resume starts afresh
    out = tmp_path / "run"
    OptuneRun(micro_config(tmp_path, ONE_DEVICE), progress=False).close()
    _fails(capsys, [*_micro_argv(out, ONE_DEVICE), "--resume"],
           f"error: cannot resume {out}: it holds no checkpoint (the run stopped before its first "
           "iteration ended); start it afresh with --overwrite")
    run = OptuneRun(micro_config(tmp_path, ONE_DEVICE), resume="auto", progress=False)
    run.close()
    assert capsys.readouterr().err == f"note: {out} holds no checkpoint yet: starting afresh\n"


def test_data_errors_come_before_the_weights_load(tmp_path, capsys, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("the weights loaded before the data was read")

    monkeypatch.setattr("optune_jax.loop.load_policy", no_weights)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": \n')
    _fails(capsys, _micro_argv(tmp_path / "run", ONE_DEVICE, f"data.train_files=[{bad}]"),
           f"{bad} line 2")


def test_a_cap_on_the_prompts_is_said(tmp_path):
    from optune_jax import prompts
    from optune_jax.components import policy_tokenizer

    cfg = micro_config(tmp_path, "data.num_train_prompts=100000", "data.num_eval_prompts=7")
    train_set, held_out = prompts.load_prompts(cfg, policy_tokenizer(cfg.model), pair_files=False)
    line = prompts.describe(train_set, held_out, cfg.data)
    assert line.endswith("; data.num_train_prompts=100000 but the files hold 640 prompts: all "
                         "640 used")
    assert not held_out.capped


def test_the_report_says_a_run_is_unfinished(uninterrupted, tmp_path, capsys):
    _, whole = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(whole, run, ignore=shutil.ignore_patterns("checkpoints"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["optune"]["iterations"] = 3  # planned 3, stopped after 2
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert report.main([str(run), "--out", str(tmp_path / "report")]) == 0
    note = (f"{run} is unfinished: 2 of 3 iterations; its final figures are after iteration 1")
    assert capsys.readouterr().err == f"note: {note}\n"
    assert f"Note: {note}." in (tmp_path / "report" / "report.md").read_text()


def test_a_damaged_checkpoint_is_reported_by_us_alone(uninterrupted, tmp_path, capsys):
    """orbax's own absl WARNING about a missing metadata file stays unprinted: our one line
    says which checkpoint is damaged and where the run continues."""
    _, whole = uninterrupted
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    (out / "checkpoints" / "1" / "_CHECKPOINT_METADATA").unlink()
    capsys.readouterr()
    assert train.main([*_micro_argv(out), "--resume"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert not [ln for ln in err if "absl" in ln], err
    assert err[0].startswith("warning: checkpoint 1 is damaged") and len(err) == 2
    assert err[1] == f"resuming {out} from checkpoint 0: iteration 0 done, 1 to go"
    assert _iterations(out / "metrics.jsonl") == [-1, 0, 1]


def test_a_failing_user_reward_stops_in_one_line_and_checkpoints_nothing(tmp_path, capsys,
                                                                          monkeypatch):
    (tmp_path / "flaky_reward.py").write_text(
        "def score(rows, responses):\n"
        "    return [float('nan') if i == 3 else 0.5 for i, _ in enumerate(responses)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flaky_reward", raising=False)
    out = tmp_path / "run"
    _fails(capsys, _micro_argv(out, ONE_DEVICE, "reward.name=flaky_reward:score"),
           "error: reward 'flaky_reward:score': score nan for response 3 is not finite (prompt: ")
    assert not list((out / "checkpoints").iterdir())
    with pytest.raises(RunError, match="holds no checkpoint"):
        OptuneRun(micro_config(tmp_path, ONE_DEVICE, "reward.name=flaky_reward:score"),
                  resume=True, progress=False)

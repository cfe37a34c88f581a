"""The OPTune loop end to end on the tiny config: learning, accounting, exact resume, bad input."""

import errno
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from optune_jax import reward_history, train
from optune_jax.loop import OptuneRun
from optune_jax.policy_trainer import PolicyTrainer
from optune_jax.run.config_file import load_config
from optune_jax.run.errors import RunError

# a smaller tiny run for the tests that only need the machinery
MICRO = [
    "optune.iterations=2",
    "data.num_train_prompts=16",
    "data.num_eval_prompts=4",
    "sampling.max_new_tokens=4",
    "sampling.batch_size=16",
    "train.batch_size=8",
    "train.micro_batch_size=4",
    "train.epochs=1",
    "eval.drift=false",  # the drift metrics are tested in test_drift.py and the tiny run below
]


# one device rather than conftest's 8 simulated ones (a run takes a third less time): for the
# tests of what a run does, not of how it is laid out. The 8-device mesh stays with the resume
# and fault tests (sharded checkpoints), LoRA, hypo, test_multihost.py and test_sharding.py.
ONE_DEVICE = "mesh.fsdp=1"


def micro_config(tmp_path, *extra):
    return load_config("configs/tiny.yaml", [*MICRO, f"run.output_dir={tmp_path / 'run'}", *extra])


@pytest.mark.optimized  # runs long enough that optimising pays
def test_tiny_config_learns_and_accounts_for_generation(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert (
        train.main(
            ["--config", "configs/tiny.yaml", "--no-progress", "--set", f"run.output_dir={out}",
             "--set", ONE_DEVICE]  # as `make tiny` runs on a CPU: one device
        )
        == 0
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before, iters = records[0], records[1:]
    assert before["iteration"] == -1 and [r["iteration"] for r in iters] == [0, 1, 2]
    # held-out reward rises beyond noise: the gain's paired 95 % interval excludes 0 (the gain's
    # size depends on the CPU's arithmetic: +0.024 ± 0.016 on an AMD EPYC, more on an Intel Xeon)
    last = iters[-1]
    assert last["eval.reward"] - before["eval.reward"] > last["eval.reward_gain_ci95"] > 0
    assert iters[-1]["eval.win_score"] > 50
    # design §4 accounting: everything at t = 0, then ceil(0.5 * 64) prompts
    assert [r["prompts_regenerated"] for r in iters] == [64, 32, 32]
    assert [r["responses_generated"] for r in iters] == [128, 64, 64]
    assert iters[-1]["total.prompts_regenerated"] == 128
    for r in iters:
        assert r["pairs"] + r["pairs_dropped_ties"] == 64
        assert r["tokens_generated"] > 0
        assert 0 < r["eval.reward_gain_ci95"] < 0.5  # paired over the 32 held-out prompts
        assert all(r[f"seconds.{k}"] > 0 for k in ("generation", "reward", "reference", "training"))
    assert iters[0]["reward_kept"] is None and iters[1]["reward_kept"] > 0  # NaN: JSON null
    # drift from π_0: none before training, some after; greedy answers kept for the summary
    assert before["eval.kl_initial"] == 0.0 and iters[-1]["eval.kl_initial"] > 0.01
    assert all(r["eval.nll_initial"] > 0 and len(r["eval.examples"]) == 3 for r in records)
    assert (out / "model" / "model.safetensors").exists()
    assert list((out / "tensorboard").iterdir())
    printed = capsys.readouterr().out
    assert "held-out reward" in printed and "NLL under π_0 of greedy answers" in printed
    assert printed.count("\n| before | after |") == 3  # three answers side by side
    # the end in words (after the export line), the same line closing summary.md, and the plot
    last_line = printed.rstrip().splitlines()[-1]
    assert last_line.startswith("In words: held-out reward ")
    assert "(95 %, paired over 32" in last_line
    assert (out / "summary.md").read_text().rstrip().endswith(last_line)
    assert (out / "run_plot.png").read_bytes()[:4] == b"\x89PNG"
    gain = iters[-1]["eval.reward"] - before["eval.reward"]
    assert iters[-1]["eval.reward_gain"] == pytest.approx(gain, abs=1e-6)


def _params(run):
    return jax.device_get(run.state.params)


def _iterations(path) -> list[int]:
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines()]


def _resumes_to(want, cfg, next_iteration: int, resume=True) -> list[dict]:
    """Resumes the run of `cfg` (from `next_iteration`) to its end, checks that its final
    parameters are exactly `want`, and returns its metrics records."""
    run = OptuneRun(cfg, resume=resume, progress=False)
    assert run.next_step == next_iteration
    records = run.run()
    got = _params(run)
    run.close()
    jax.tree.map(np.testing.assert_array_equal, want, got)  # exact on the CPU
    return records


def test_a_run_killed_mid_iteration_resumes_to_the_same_parameters(
    uninterrupted, tmp_path, monkeypatch
):
    want, whole = uninterrupted
    cfg = micro_config(tmp_path / "b")
    killed = OptuneRun(cfg, progress=False)
    real_train = PolicyTrainer.train

    def dies_in_iteration_1(self, state, batch, t, **kw):
        if t == 1:
            raise KeyboardInterrupt  # killed after generating, mid-iteration
        return real_train(self, state, batch, t, **kw)

    monkeypatch.setattr(PolicyTrainer, "train", dies_in_iteration_1)
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    killed.close()
    monkeypatch.setattr(PolicyTrainer, "train", real_train)
    records = _resumes_to(want, cfg, next_iteration=1)
    assert [r["iteration"] for r in records] == [-1, 0, 1]
    history = reward_history.FILE  # per-prompt rewards, line for line the uninterrupted run's
    assert (tmp_path / "b" / "run" / history).read_text() == (whole / history).read_text()


def _spy_reference_and_training(run, keep):
    """Lists filled as `run` goes: the pairs each reference pass scores, `keep(batch)` of
    each batch the training phase gets."""
    scored, kept = [], []
    reference, train_phase = run.ref_logps, run.trainer.train

    def spy_reference(params, tokens, *rows, **kw):
        scored.append(len(tokens))
        return reference(params, tokens, *rows, **kw)

    def spy_train(state, batch, t, **kw):
        kept.append(keep(batch))
        return train_phase(state, batch, t, **kw)

    run.ref_logps, run.trainer.train = spy_reference, spy_train
    return scored, kept


def _fails(capsys, argv, message):
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err, err


def test_bad_input_stops_with_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--config", "configs/tiny.yaml", "--no-progress", "--set", f"run.output_dir={out}"]
    _fails(capsys, ["--config", str(tmp_path / "nope.yaml")], "nope.yaml")
    _fails(capsys, [*base, "--set", "optune.rhoo=0.5"], "did you mean 'optune.rho'")
    _fails(capsys, [*base, "--set", "optune.rho=1.5"], "(0, 1]")
    _fails(capsys, [*base, "--set", "loss.name=kto"], "unknown loss 'kto'")
    _fails(capsys, [*base, "--set", "reward.name=judge"], "unknown reward 'judge'")
    _fails(capsys, [*base, "--set", "data.prompt_column=question"], "question")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails(capsys, [*base, "--set", f"data.train_files=[{empty}]"], "empty")
    # issue 20, case 8: an empty config file does not start the default job
    _fails(capsys, ["--config", str(tmp_path / "empty.jsonl")], "is empty; give at least one")
    # issue 20, case 6: an output directory under a file, or where nothing can be created
    readme = tmp_path / "README.md"
    readme.write_text("mine")
    _fails(capsys, [*base, "--set", f"run.output_dir={readme}/sub"],
           f"error: cannot use the output directory {readme}/sub: {readme} is a file, not a "
           "directory")
    _fails(capsys, [*base, "--set", "run.output_dir=/proc/optune"],
           "cannot use the output directory /proc/optune: the file system at /proc refuses new")
    assert not out.exists()  # nothing half-written by any of the above


def test_output_dir_guards_and_incompatible_resume(uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted[1], out)  # the finished micro run: iterations -1, 0, 1
    base = ["--config", "configs/tiny.yaml", "--no-progress", "--no-export",
            *[x for s in MICRO for x in ("--set", s)], "--set", f"run.output_dir={out}"]
    _fails(capsys, base, "already holds a run")
    _fails(capsys, [*base, "--resume", "--set", "loss.beta=0.5"], "loss.beta")
    # a longer run resuming, --overwrite starting afresh: tests/test_runner.py
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    capsys.readouterr()
    _fails(capsys, [*base, "--set", f"run.output_dir={other}"], "not an optune-jax run")


def test_a_half_written_checkpoint_is_never_taken_for_a_complete_one(uninterrupted, tmp_path):
    shutil.copytree(uninterrupted[1], tmp_path / "run")  # checkpoints 0 and 1 of 2 iterations
    ckpts = tmp_path / "run" / "checkpoints"
    partial = ckpts / "2.orbax-checkpoint-tmp-1700000000"  # a save cut by a kill
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"\0" * 64)
    resumed = OptuneRun(micro_config(tmp_path, "optune.iterations=3"), resume=True, progress=False)
    assert resumed.ckpt.latest() == 1 and resumed.next_step == 2
    assert resumed.ckpt.meta(1)["config"]["optune"]["iterations"] == 2
    resumed.close()


def test_lora_ensemble_trains_adapters_and_exports_the_merged_model(tmp_path):
    cfg = micro_config(tmp_path, "optune.iterations=1", "lora.rank=4", "lora.num_adapters=2",
                       "train.learning_rate=5e-2")
    run = OptuneRun(cfg, progress=False)
    base = jax.device_get(run.frozen)
    records = run.run()
    assert set(run.state.params) == set(cfg.lora.targets)  # only adapters were trained
    merged = jax.device_get(run.policy_params())
    q = merged["layers"]["attn"]["q_proj"]["kernel"]
    assert not np.allclose(q, base["layers"]["attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(merged["embed"]["embedding"], base["embed"]["embedding"])
    out = run.export()
    run.close()
    from models import load_hf_checkpoint

    _, exported = load_hf_checkpoint(out)
    np.testing.assert_allclose(exported["layers"]["attn"]["q_proj"]["kernel"], q, atol=1e-6)
    assert records[-1]["train.loss"] > 0


def test_hypo_draws_exact_online_samples_and_its_kl_starts_at_zero(tmp_path, monkeypatch):
    run = OptuneRun(micro_config(tmp_path, "run.mode=hypo", "loss.name=hypo", "loss.lam=0.5",
                                 "hypo.samples_per_prompt=2", "optune.reference=initial"),
                    progress=False)
    assert run.cfg.sampling.top_p < 1  # the pairs' settings; the KL's samples are exact
    draws, generate = [], run.generator.__call__
    monkeypatch.setattr(type(run.generator), "__call__", lambda self, *a, **kw: (
        draws.append(kw), generate(*a, **kw))[1])
    records = run.run()[1:]
    online = [kw for kw in draws if "online" in kw["desc"]]
    assert online and all(
        kw["temperature"] == 1.0 and kw["top_p"] == 1.0 and kw["top_k"] == 0 for kw in online)
    run.close()
    # D_0 (16 prompts) at t = 0, then only the KL's online samples: 2 steps x 8 prompts
    assert [r["prompts_regenerated"] for r in records] == [16 + 16, 16]
    assert [r["responses_generated"] for r in records] == [32 + 32, 32]
    # the reference is π_0 (design §5): the policy at the first step of iteration 0 only
    assert abs(records[0]["train.first.kl"]) < 1e-4
    assert abs(records[0]["train.first.margin"]) < 1e-5
    assert abs(records[1]["train.first.kl"]) > 1e-4
    for r in records:
        assert r["train.kl"] != 0.0 and np.isfinite(r["train.kl"])
    assert records[-1]["total.tokens_generated"] == sum(r["tokens_generated"] for r in records)


def test_offline_pairs_from_a_file(tmp_path, capsys):
    """Offline DPO on a pair file with optune.reference=initial: nothing is generated; π_0
    scores every pair once, at iteration 0, and training sees exactly those logps (the
    reference choices one by one: tests/test_reference_policy.py); bad settings stop in one
    line."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Say something about the number {i}.", "chosen": "a e i o u " * 3,
             "rejected": "x y z " * 4} for i in range(16)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = OptuneRun(micro_config(tmp_path, "run.mode=offline", "loss.name=dpo", ONE_DEVICE,
                                 f"data.offline_files=[{pairs}]", "optune.reference=initial"),
                    progress=False)
    assert run.initial_params is not None
    reference = run.ref_logps
    scored, batches = _spy_reference_and_training(run, lambda batch: batch)
    records = run.run()[1:]
    assert scored == [16]  # every pair at iteration 0, none again at iteration 1
    for batch in batches:  # what training saw: the pairs' logps under π_0, computed afresh
        want = reference(run.initial_params, batch.tokens, batch.attn, batch.resp)
        np.testing.assert_allclose(batch.ref_logps, want, rtol=1e-5, atol=1e-4)
    run.close()
    assert [r["tokens_generated"] for r in records] == [0, 0]
    assert records[-1]["train.margin"] > records[0]["train.margin"]  # π_0's margins grow
    base = ["--config", "configs/tiny.yaml", "--set", f"run.output_dir={tmp_path / 'x'}",
            "--set", "run.mode=offline", "--set", f"data.offline_files=[{pairs}]"]
    capsys.readouterr()
    _fails(capsys, base, "loss.name=wdpo does not fit run.mode=offline; allowed: dpo, ipo, hinge")
    _fails(capsys, [*base, "--set", "loss.name=dpo", "--set", "data.chosen_column=good"],
           "no text column 'good'")
    _fails(capsys, [*base, "--set", "loss.name=dpo", "--set", "optune.reference=behavior"],
           "optune.reference=behavior needs the policy that generated each pair")
    _fails(capsys, [*base, "--set", "run.mode=hypo", "--set", "loss.name=hypo"],
           "optune.reference=current does not fit loss.name=hypo")
    _fails(capsys, [*base, "--set", "loss.name=dpo", "--set", "sampling.num_samples=4"],
           "sampling.num_samples=4 has no effect on pairs from data.offline_files; allowed: 2")


class _HalfFull:
    """A file that takes half of iteration 1's metrics line and then reports a full disk."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, text: str):
        if '"iteration": 1,' not in text:
            return self.f.write(text)
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device", self.f.name)


def test_failures_inside_the_checkpoint_and_metrics_writes_resume_to_the_same_parameters(
    uninterrupted, tmp_path, monkeypatch
):
    # issue 20: fault injection; also cases 4 (a torn last line) and 5 (no second iteration -1)
    want, _ = uninterrupted
    cfg = micro_config(tmp_path)
    log = tmp_path / "run" / "metrics.jsonl"

    # 1. the disk fills inside orbax while checkpoint 0 is written: the run stops in one line
    async def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path))

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", no_space)
    run = OptuneRun(cfg, progress=False)
    with pytest.raises(RunError, match=r"^cannot write checkpoint \S+/checkpoints/0: no space "):
        run.run()
    run.close()
    monkeypatch.undo()
    assert _iterations(log) == [-1, 0]  # a line is written before its checkpoint

    # 2. no complete checkpoint: --resume refuses; --auto-resume starts over and writes
    # iteration -1 once; then the disk fills halfway through iteration 1's line
    with pytest.raises(RunError, match=r"holds no checkpoint .*; start it afresh with --overwrite"):
        OptuneRun(cfg, resume=True, progress=False)
    real_open = Path.open

    def half_full(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        return _HalfFull(f) if self == log and mode == "a" else f

    monkeypatch.setattr(Path, "open", half_full)
    run = OptuneRun(cfg, resume="auto", progress=False)
    assert run.next_step == 0
    with pytest.raises(RunError, match=f"^cannot write {log}: no space left on device$"):
        run.run()
    run.close()
    monkeypatch.undo()
    torn = log.read_text()
    assert not torn.endswith("\n")
    assert [json.loads(line)["iteration"] for line in torn.splitlines()[:-1]] == [-1, 0]

    # 3. resumed from checkpoint 0: the torn line is dropped and iteration 1 runs again
    records = _resumes_to(want, cfg, next_iteration=1)
    assert [r["iteration"] for r in records] == _iterations(log) == [-1, 0, 1]


def test_a_truncated_newest_checkpoint_resumes_from_the_one_before(uninterrupted, tmp_path, capsys):
    # issue 20, case 2: an array file of checkpoint 1 cut short; the run goes on from checkpoint
    # 0 and ends with the parameters of the uninterrupted run
    want, whole = uninterrupted
    shutil.copytree(whole, tmp_path / "run")
    state = tmp_path / "run" / "checkpoints" / "1" / "state"
    big = max((f for f in state.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    big.write_bytes(big.read_bytes()[:100])
    capsys.readouterr()
    records = _resumes_to(want, micro_config(tmp_path), next_iteration=1)
    assert [r["iteration"] for r in records] == [-1, 0, 1]
    # the reward history is cut back to checkpoint 0 with metrics.jsonl, then iteration 1's
    # line written again: the uninterrupted run's file
    history = reward_history.FILE
    assert (tmp_path / "run" / history).read_text() == (whole / history).read_text()
    warning, resuming = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith(f"warning: checkpoint 1 is damaged: "
                              f"{big.relative_to(state.parent)} has 100 of its ")
    assert warning.endswith("(moved to checkpoints.damaged/); resuming from checkpoint 0")
    assert resuming == f"resuming {tmp_path / 'run'} from checkpoint 0: iteration 0 done, 1 to go"
    assert (tmp_path / "run" / "checkpoints.damaged" / "1" / "state").is_dir()  # kept, aside

"""π_0's evaluation kept on disk (optune_jax.run.eval_cache): what its key depends on, whole files
only, and a second run that reuses it records exactly what the first computed."""

import json

import numpy as np
import pytest

from optune_jax import evaluate as evaluate_lib
from optune_jax.loop import OptuneRun
from optune_jax.run import eval_cache
from optune_jax.run.config_file import load_config
from optune_jax.run.errors import RunError
from tests.test_loop import MICRO, ONE_DEVICE


def _cfg(*sets):
    return load_config("configs/tiny.yaml", list(sets))


PARAMS = {"layer": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
PROMPTS, ROWS = [[1, 2, 3], [1, 4]], [{"prompt": "a"}, {"prompt": "b"}]


def test_the_key_follows_what_determines_the_evaluation_and_nothing_else():
    base = eval_cache.key(_cfg(), PARAMS, PROMPTS, ROWS)
    assert base == eval_cache.key(_cfg(), PARAMS, PROMPTS, ROWS)  # deterministic
    nudged = {"layer": {"w": PARAMS["layer"]["w"].copy()}}
    nudged["layer"]["w"][1, 2] = np.nextafter(np.float32(5), np.float32(6))  # one ulp
    changed = [
        eval_cache.key(_cfg(), nudged, PROMPTS, ROWS),
        eval_cache.key(_cfg(), PARAMS, [[1, 2, 3], [1, 5]], ROWS),
        eval_cache.key(_cfg(), PARAMS, PROMPTS, [{"prompt": "a"}, {"prompt": "c"}]),
        eval_cache.key(_cfg("run.seed=1"), PARAMS, PROMPTS, ROWS),
        eval_cache.key(_cfg("eval.samples_per_prompt=2"), PARAMS, PROMPTS, ROWS),
        eval_cache.key(_cfg("sampling.temperature=0.7"), PARAMS, PROMPTS, ROWS),
        eval_cache.key(_cfg("reward.name=sentiment"), PARAMS, PROMPTS, ROWS),
        eval_cache.key(_cfg("data.max_prompt_tokens=32"), PARAMS, PROMPTS, ROWS),
    ]
    assert base not in changed and len(set(changed)) == len(changed)
    # what an evaluation does not depend on: the method, ρ, training, the divergence limits
    for same in (["optune.rho=1.0"], ["loss.name=dpo"], ["train.learning_rate=1e-3"],
                 ["eval.max_kl=5"], ["eval.initial_cache=/elsewhere"], ["run.mode=offline"]):
        assert eval_cache.key(_cfg(*same), PARAMS, PROMPTS, ROWS) == base, same


def test_save_then_load_round_trips_and_damage_reads_as_absent(tmp_path):
    rewards = np.float32([0.1, -0.7, 1 / 3])
    record = {"eval.reward": 0.25, "eval.examples": [{"prompt": "p", "answer": "a"}]}
    assert eval_cache.load(tmp_path / "none", "abc") is None
    eval_cache.save(tmp_path / "cache", "abc", rewards, record)
    got, got_record = eval_cache.load(tmp_path / "cache", "abc")
    np.testing.assert_array_equal(got, rewards)  # float32 exactly
    assert got.dtype == np.float32 and got_record == record
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["abc.json"]  # no temporary left
    path = tmp_path / "cache" / "abc.json"
    path.write_text(path.read_text()[:20])  # torn
    assert eval_cache.load(tmp_path / "cache", "abc") is None
    path.write_text(json.dumps({"format": eval_cache.FORMAT + 1, "rewards": [], "record": {}}))
    assert eval_cache.load(tmp_path / "cache", "abc") is None


def test_an_unwritable_cache_stops_in_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunError, match=r"^cannot write the evaluation of π_0 to .*file/abc"):
        eval_cache.save(tmp_path / "file", "abc", np.zeros(2, np.float32), {})


def _run(tmp_path, name, *extra):
    cfg = load_config("configs/tiny.yaml", [*MICRO, ONE_DEVICE, "eval.drift=true",
                                            f"eval.initial_cache={tmp_path / 'cache'}",
                                            f"run.output_dir={tmp_path / name}", *extra])
    run = OptuneRun(cfg, progress=False)
    try:
        return run.run(), run.initial_eval
    finally:
        run.close()


def test_a_second_run_reuses_the_first_runs_evaluation_of_pi0_exactly(tmp_path, monkeypatch):
    first, first_eval = _run(tmp_path, "a")
    assert first[0]["eval.cached"] is False and len(list((tmp_path / "cache").iterdir())) == 1
    calls = []
    original = evaluate_lib.Evaluator.__call__

    def spy(self, params, *, initial=False):
        calls.append(initial)
        return original(self, params, initial=initial)

    monkeypatch.setattr(evaluate_lib.Evaluator, "__call__", spy)
    second, second_eval = _run(tmp_path, "b", "optune.rho=1.0")  # another variant, same seed
    assert calls == [False, False]  # π_0 was not evaluated again; each iteration was
    assert second[0]["eval.cached"] is True
    np.testing.assert_array_equal(second_eval, first_eval)
    skip = ("seconds.evaluation", "eval.cached")
    assert {k: v for k, v in second[0].items() if k not in skip} == {
        k: v for k, v in first[0].items() if k not in skip}
    # the gains are paired against the same π_0 rewards as an uncached run's would be
    for r in second[1:]:
        assert np.isfinite(r["eval.reward_gain"])
    # generation seconds carry their compile seconds apart (design §9); iteration 0 may reuse
    # the programs π_0's evaluation compiled, so only the bounds and the running sum are fixed
    for r in first[1:]:
        assert 0 <= r["seconds.generation_compile"] <= r["seconds.generation"]
    assert first[-1]["total.generation_compile_seconds"] == pytest.approx(
        sum(r["seconds.generation_compile"] for r in first[1:]))

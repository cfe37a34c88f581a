"""The ρ sweep finishes (and resumes) its variants; the report draws and tabulates them."""

import json

import numpy as np
import pytest
import yaml

from optune_jax import reward_history
from optune_jax.study import report, sweep

from .test_loop import MICRO, ONE_DEVICE


def test_variants_cover_the_grid_once():
    names = [n for n, _ in sweep.variants([0.5, 1.0], ["reward", "random"], [0, 1])]
    assert names == ["rho0.5_reward_seed0", "rho0.5_random_seed0", "rho1_reward_seed0",
                     "rho0.5_reward_seed1", "rho0.5_random_seed1", "rho1_reward_seed1"]


def test_variants_from_overrides_cross_with_seeds(capsys):
    todo = sweep.variants_from(["optune.rho=0.5 optune.selection=random",
                                "optune.rho=0.5 loss.name=dpo"], [0, 1])
    assert [n for n, _ in todo] == ["rho0.5_selection-random_seed0", "rho0.5_name-dpo_seed0",
                                    "rho0.5_selection-random_seed1", "rho0.5_name-dpo_seed1"]
    assert todo[3][1] == ["optune.rho=0.5", "loss.name=dpo", "run.seed=1"]
    for bad, why in [(["optune.rho"], "KEY=VALUE"), (["run.seed=3"], "set by the sweep"),
                     (["optune.rho=1", "optune.rho=1"], "the same variant twice")]:
        with pytest.raises(ValueError, match=why):
            sweep.variants_from(bad, [0])
    assert sweep.main(["--config", "x", "--out", "y", "--rho", "0.5",
                       "--variant", "loss.name=dpo"]) == 2
    assert "replaces --rho/--selection" in capsys.readouterr().err


def _fake_run(path, *, rho, selection, seed, final, gains):
    """A run directory as the loop leaves it, without training: config, metrics, history."""
    path.mkdir(parents=True)
    cfg = {"run": {"mode": "optune", "seed": seed, "output_dir": str(path)},
           "optune": {"rho": rho, "selection": selection, "rank_key": "chosen",
                      "iterations": 2}, "loss": {"name": "wdpo"}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    cost = {f"seconds.{p}": 1.0 for p in report.PHASES}
    records = [{"iteration": -1, "eval.reward": 0.2, "eval.win_score": 50.0}]
    for t, reward in enumerate([0.25, final]):
        records.append({"iteration": t, "eval.reward": reward, "eval.win_score": 100 * reward,
                        "total.prompts_regenerated": 8 * (t + 1), "total.generation_seconds": t,
                        "total.tokens_generated": 100 * (t + 1), "tokens_generated": 100, **cost})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    chosen = np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4] + np.array(gains)])
    lines = [{"iteration": t, "regenerated": [1] * 4, "chosen": chosen[t].tolist(),
              "rejected": (chosen[t] - 0.1).tolist()} for t in range(2)]
    (path / reward_history.FILE).write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_report_groups_pairs_and_splits_the_gain(tmp_path):
    # three variants over three seeds: OPTune beats ρ = 1 by 0.05 in every seed (resolved);
    # random selection is level with it (not resolved)
    noise = [0.0, 0.1, -0.05]
    runs = []
    for seed, n in enumerate(noise):
        for name, rho, selection, diff in [("full", 1.0, "reward", 0.0),
                                           ("optune", 0.5, "reward", 0.04 + 0.01 * seed),
                                           ("random", 0.5, "random", [0.03, -0.03, 0.01][seed])]:
            runs.append(tmp_path / f"{name}{seed}")
            _fake_run(runs[-1], rho=rho, selection=selection, seed=seed, final=0.3 + n + diff,
                      gains=[0.3, 0.1, 0.0, 0.0])  # the bottom half gains 0.4 of 0.4
    out = tmp_path / "docs"
    assert report.main([*map(str, runs), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| ρ=0.5, selection=reward | 3 | 0.2000 → 0.3667 ± " in text
    assert "| ρ=1 | ρ=0.5, selection=reward | 3 | +0.0500 ± 0.0248 |" in text
    resolved, unresolved = text.split("\nResolved (")[1].split("\nNot resolved (")
    assert "- ρ=0.5, selection=reward vs ρ=1: held-out reward +0.0500 ± 0.0248\n" in resolved
    assert "selection=random vs ρ=1" not in resolved
    assert "- ρ=0.5, selection=random vs ρ=1: held-out reward +0.0033 ± 0.0759\n" in unresolved
    assert "| ρ=0.5, selection=random | ρ=1 |" not in text  # each pair of groups once
    # against random selection too (the default's second baseline)
    assert "| ρ=0.5, selection=random | ρ=0.5, selection=reward | 3 |" in text
    assert "| ρ=1 | 1 | 3 | 100.0% | 0.0% | +0.2000 | +0.0000 |" in text  # Fig. 2's numbers
    assert (out / "fig2.png").stat().st_size > 10_000 and "![fig2.png](fig2.png)" in text
    # an explicit baseline; one that matches several groups is said to, and skipped
    assert report.main([*map(str, runs), "--out", str(out), "--against", "optune.rho=0.5"]) == 0
    assert "`optune.rho=0.5`: matches 2 groups, not one" in (out / "report.md").read_text()


# the micro run (two iterations), smaller still: each variant only has to finish and leave its
# curves, with its KL to π_0 (drift)
SMALLER = [*MICRO, ONE_DEVICE, "eval.drift=true", "data.num_train_prompts=8",
           "sampling.batch_size=8", "train.micro_batch_size=8"]


def test_sweep_then_report(tmp_path, capsys):
    out = tmp_path / "sweep"
    # two variants: ρ = 1 regenerates everything, so it runs once, as `reward`, whatever the
    # selections asked for (the whole grid's names: test_variants_cover_the_grid_once)
    argv = ["--config", "configs/tiny.yaml", "--rho", "0.5", "1.0", "--selection", "random",
            "--seeds", "0", "--out", str(out), "--no-progress",
            *[x for s in SMALLER for x in ("--set", s)]]
    assert sweep.main(argv) == 0
    runs = sorted(p for p in out.iterdir() if not p.name.startswith("."))  # as a shell glob
    assert [r.name for r in runs] == ["rho0.5_random_seed0", "rho1_reward_seed0"]
    assert sweep.main(argv) == 0  # everything done: skipped, nothing rerun
    assert capsys.readouterr().out.count("done, skipped") == 2
    docs = tmp_path / "docs"
    assert report.main([*map(str, runs), "--out", str(docs)]) == 0
    text = (docs / "report.md").read_text()
    assert "| ρ=0.5 |" in text and "| ρ=1 |" in text and "paper Table 1" in text
    # selection is read only at ρ < 1, where it is random: shared, not a difference
    assert "Shared by every variant (where read): mode=optune, selection=random, " in text
    # a seed pairs the variants: the same held-out evaluation of π_0 and the same iteration-0
    # samples (every prompt generated at t = 0), so the same per-prompt rewards after it
    histories = [(r / reward_history.FILE).read_text().splitlines() for r in runs]
    assert [len(h) for h in histories] == [2, 2] and histories[0][0] == histories[1][0]
    assert json.loads(histories[0][1])["regenerated"].count(1) == 4  # ρ = 0.5 of 8 prompts
    assert json.loads(histories[1][1])["regenerated"] == [1] * 8
    assert (docs / "fig2.png").stat().st_size > 10_000 and "Fig. 2" in text
    assert (docs / "reward.png").stat().st_size > 10_000
    assert (docs / "phases.png").stat().st_size > 5_000
    assert (docs / "frontier.png").stat().st_size > 10_000  # reward–KL, one line per group
    assert "KL to π_0" in text
    # π_0 was evaluated once for the seed: the second variant read the first one's evaluation
    firsts = [json.loads((r / "metrics.jsonl").read_text().splitlines()[0]) for r in runs]
    assert [f["eval.cached"] for f in firsts] == [False, True]
    assert firsts[0]["eval.reward"] == firsts[1]["eval.reward"]
    assert len(list((out / ".initial_eval").iterdir())) == 1
    # the cost table keeps the compile seconds apart, against ρ = 1
    assert "## Generation cost against full regeneration (ρ = 1)" in text
    assert "generation s (+ compile s)" in text


def test_report_rejects_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err

"""The ρ sweep finishes (and resumes) its variants; the report draws and tabulates them."""

from optune_jax import report, sweep

from .test_loop import MICRO, ONE_DEVICE


def test_variants_cover_the_grid_once():
    names = [n for n, _ in sweep.variants([0.5, 1.0], ["reward", "random"], [0, 1])]
    assert names == ["rho0.5_reward_seed0", "rho0.5_random_seed0", "rho1_reward_seed0",
                     "rho0.5_reward_seed1", "rho0.5_random_seed1", "rho1_reward_seed1"]


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
    runs = sorted(out.iterdir())
    assert [r.name for r in runs] == ["rho0.5_random_seed0", "rho1_reward_seed0"]
    assert sweep.main(argv) == 0  # everything done: skipped, nothing rerun
    assert capsys.readouterr().out.count("done, skipped") == 2
    docs = tmp_path / "docs"
    assert report.main([*map(str, runs), "--out", str(docs)]) == 0
    text = (docs / "report.md").read_text()
    assert "Rdm ρ=0.5" in text and "ρ=1" in text and "paper Table 1" in text
    assert (docs / "reward.png").stat().st_size > 10_000
    assert (docs / "phases.png").stat().st_size > 5_000
    assert (docs / "frontier.png").stat().st_size > 10_000  # reward–KL, one line per run
    assert "KL to π_0" in text


def test_report_rejects_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err

"""A study's statistics: grouping by every differing config key, t intervals, paired seeds."""

import math

import numpy as np
import pytest

from optune_jax.study import stats


def test_t_table_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")  # not a dependency: the table stands in
    for df in range(1, 201):
        assert stats.t975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1.5e-3), df
    assert math.isnan(stats.t975(0))


def test_mean_ci_and_resolved():
    mean, half, n = stats.mean_ci([1.0, 1.2, 1.4])
    assert (mean, n) == (pytest.approx(1.2), 3)
    assert half == pytest.approx(4.303 * 0.2 / math.sqrt(3))  # t_{0.975, 2} · sd / √n
    assert stats.resolved(mean, half) and not stats.resolved(0.4, half)
    mean, half, n = stats.mean_ci([0.25])
    assert mean == 0.25 and math.isnan(half) and n == 1 and not stats.resolved(mean, half)
    assert stats.mean_ci([])[2] == 0


def _cfg(rho=0.5, selection="reward", loss="wdpo", seed=0, **extra):
    cfg = {"run": {"mode": "optune", "seed": seed, "output_dir": f"runs/{rho}_{seed}",
                   "keep_checkpoints": 2},
           "optune": {"rho": rho, "selection": selection, "rank_key": "chosen"},
           "loss": {"name": loss, "beta": 0.1}, "eval": {"examples": 3, "drift": seed == 0},
           "data": {"train_files": ["a.jsonl"]}, "mesh": {"fsdp": seed - 1}}
    for key, value in extra.items():
        section, name = key.split("__")
        cfg.setdefault(section, {})[name] = value
    return stats.relevant(stats.flatten(cfg))


def test_groups_by_every_differing_key_and_pairs_by_seed():
    # the study's variants over two seeds; the seed, output dir, drift, examples and mesh
    # differ too but cannot change results; selection is moot at ρ = 1
    specs = [dict(rho=r) for r in (0.3, 0.5, 0.7)] + [
        dict(rho=1.0, selection="random"), dict(selection="random"), dict(loss="dpo")]
    runs = [dict(name=i, seed=s) for s in (0, 1) for i in range(len(specs))]
    configs = [_cfg(**specs[r["name"]], seed=r["seed"]) for r in runs]
    assert stats.differing_keys(configs) == ["optune.rho", "optune.selection", "loss.name"]
    groups = stats.group_runs(runs, configs)
    assert [g.label for g in groups] == [
        "ρ=1, loss=wdpo", "ρ=0.7, selection=reward, loss=wdpo",
        "ρ=0.5, selection=random, loss=wdpo", "ρ=0.5, selection=reward, loss=dpo",
        "ρ=0.5, selection=reward, loss=wdpo", "ρ=0.3, selection=reward, loss=wdpo"]
    assert all(sorted(r["seed"] for r in g.runs) == [0, 1] for g in groups)
    assert stats.default_baselines(groups) == ["optune.rho=1.0", "optune.selection=random"]
    assert stats.matching(groups, stats.parse_match("optune.rho=1"))[0] is groups[0]
    assert len(stats.matching(groups, stats.parse_match("optune.rho=0.5"))) == 3
    assert [g.label for g in stats.matching(
        groups, stats.parse_match("optune.rho=0.5 loss.name=dpo"))] == [groups[3].label]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        stats.parse_match("optune.rho")
    # a key only some configs have counts as differing; a list value is hashable
    assert stats.differing_keys([_cfg(), _cfg(train__schedule="continuous")]) == [
        "train.schedule"]
    assert stats.label({"data.train_files": ("a", "b"), "optune.rank_key": stats.MOOT}) == (
        "data.train_files=a,b")
    assert stats.group_runs([1, 2], [_cfg(), _cfg(seed=3)])[0].label == "all runs"


def test_paired_differences_match_seeds():
    d = stats.paired({0: 1.0, 1: 2.0, 2: 5.0}, {1: 1.5, 0: 0.5, 3: 9.0})
    np.testing.assert_array_equal(d, [0.5, 0.5])

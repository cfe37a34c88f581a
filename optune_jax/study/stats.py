"""The statistics of a study of runs (issue 17): which config keys tell the runs apart, groups
of seeds, Student-t 95 % confidence intervals, and paired differences against a baseline group.

Pure: config dicts, numbers and run records in, numbers and labels out (`report` reads the run
directories and writes the tables, `plots` draws the figures).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import yaml

from optune_jax import reward_history

# Keys that cannot change what a run learns or measures: the seed (it pairs runs instead),
# where a run writes and how often it saves, the device layout, the greedy answers it prints,
# the extra drift measurements, the stop after non-finite steps (such a run fails anyway) and
# rematerialization (the same math recomputed). A key ending in "." ignores a whole section.
IGNORED = (
    "run.seed", "run.output_dir", "run.keep_checkpoints", "eval.examples", "eval.drift",
    "train.max_skipped_steps", "model.remat", "model.attention", "mesh.", "distributed.",
    "run.compilation_cache",
)
# the order labels name the keys in (others follow alphabetically), and their short names
FIRST = ("run.mode", "optune.rho", "optune.selection", "optune.rank_key", "optune.reference",
         "loss.name")
SHORT = {"optune.rho": "ρ", "optune.selection": "selection", "optune.rank_key": "rank key",
         "optune.reference": "reference", "loss.name": "loss", "run.mode": "mode"}
MODES = {"optune": 0, "hypo": 1, "offline": 2}


class _Moot:
    def __repr__(self) -> str:
        return "MOOT"


MOOT = _Moot()  # the value of a setting the run never reads (`relevant`)

# two-sided 95 % quantiles of Student's t, df = 1..30 (t_{0.975, df})
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """t_{0.975} with `df` degrees of freedom: the table up to 30, then the Cornish-Fisher
    expansion around the normal quantile (error < 1e-3)."""
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(x: Sequence[float]) -> tuple[float, float, int]:
    """(mean, half-width of its 95 % Student-t interval, n); the half-width is NaN below n = 2."""
    x = np.asarray(x, np.float64)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    half = t975(n - 1) * x.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
    return float(x.mean()), float(half), n


def resolved(mean: float, half: float) -> bool:
    """True when the 95 % interval mean ± half excludes 0."""
    return math.isfinite(half) and abs(mean) > half


def _hashable(v: Any) -> Any:
    """Lists as tuples and mappings as sorted (key, value) tuples, all the way down."""
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """{"section.key": value} of a nested config dict; lists become tuples (hashable)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = _hashable(v)
    return out


def relevant(flat: dict[str, Any], ignore: Iterable[str] = ()) -> dict[str, Any]:
    """The keys of a flat config that can change results: IGNORED and `ignore` left out, and
    the settings a run never reads set to MOOT: ρ, selection and rank key outside OPTune, the
    selection and rank key at ρ = 1 (everything is regenerated), the rank key under random
    selection."""
    skip = (*IGNORED, *ignore)
    out = {k: v for k, v in flat.items()
           if not any(k == s or (s.endswith(".") and k.startswith(s)) for s in skip)}
    moot = []
    if out.get("run.mode", "optune") != "optune":
        moot = ["optune.rho", "optune.selection", "optune.rank_key"]
    elif out.get("optune.rho") == 1:
        moot = ["optune.selection", "optune.rank_key"]
    elif out.get("optune.selection") == "random":
        moot = ["optune.rank_key"]
    return {k: (MOOT if k in moot else v) for k, v in out.items()}


def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """The keys (of `relevant` flat configs) with more than one value over the configs that
    read them (MOOT left out); a key missing from some config counts as None there. FIRST's
    keys first."""
    keys = set().union(*configs) if configs else set()
    values = lambda k: {repr(c.get(k)) for c in configs if c.get(k) is not MOOT}  # noqa: E731
    differ = [k for k in keys if len(values(k)) > 1]
    return sorted(differ, key=lambda k: (FIRST.index(k) if k in FIRST else len(FIRST), k))


def shared(configs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """FIRST's keys that do not tell the configs apart, with their one value where read."""
    differ = set(differing_keys(configs))
    out = {}
    for k in FIRST:
        values = {repr(c.get(k)): c.get(k) for c in configs if c.get(k) is not MOOT}
        if k not in differ and len(values) == 1:
            out[k] = next(iter(values.values()))
    return out


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return ",".join(map(_value, v))
    return str(v)


def label(values: dict[str, Any]) -> str:
    """A short name from a group's differing keys, e.g. "ρ=0.5, selection=random, loss=dpo";
    MOOT values (settings the run never reads) are left out."""
    parts = [f"{SHORT.get(k, k)}={_value(v)}" for k, v in values.items() if v is not MOOT]
    return ", ".join(parts) or "all runs"


@dataclasses.dataclass
class Group:
    """Runs that differ only in their seed: `values` of the differing keys, `runs` as given."""

    label: str
    values: dict[str, Any]
    config: dict[str, Any]  # the relevant flat config the runs share
    runs: list = dataclasses.field(default_factory=list)


def group_runs(runs: Sequence[Any], configs: Sequence[dict[str, Any]]) -> list[Group]:
    """Groups `runs` by every differing key of their `relevant` flat `configs`, ordered by
    mode (OPTune, HyPO, offline), then ρ from high to low, then the other values."""
    keys = differing_keys(configs)
    groups: dict[tuple, Group] = {}
    for run, cfg in zip(runs, configs, strict=True):
        values = {k: cfg.get(k) for k in keys}
        ident = tuple(repr(v) for v in values.values())
        if ident not in groups:
            groups[ident] = Group(label(values), values, cfg)
        groups[ident].runs.append(run)

    def order(g: Group):
        rho = g.config.get("optune.rho")
        return (MODES.get(g.config.get("run.mode", "optune"), 3),
                -rho if isinstance(rho, int | float) else 0.0,
                tuple(_value(v) for v in g.values.values()))

    return sorted(groups.values(), key=order)


def parse_match(text: str) -> dict[str, Any]:
    """"optune.rho=1.0 optune.selection=random" -> {"optune.rho": 1.0, ...} (YAML values)."""
    out = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    if not out:
        raise ValueError("expected at least one KEY=VALUE")
    return out


def matching(groups: Sequence[Group], match: dict[str, Any]) -> list[Group]:
    """The groups whose shared config has every value of `match`."""
    return [g for g in groups if all(g.config.get(k, None) == v for k, v in match.items())]


def default_baselines(groups: Sequence[Group]) -> list[str]:
    """The usual baselines where they exist as one group: ρ = 1 and random selection."""
    out = []
    for spec in ("optune.rho=1.0", "optune.selection=random"):
        key = spec.split("=")[0]
        if any(key in g.values for g in groups) and len(matching(groups, parse_match(spec))) == 1:
            out.append(spec)
    return out


def paired(a: dict[int, float], b: dict[int, float]) -> np.ndarray:
    """a[seed] - b[seed] over the seeds both have, in seed order."""
    return np.array([a[s] - b[s] for s in sorted(set(a) & set(b))], np.float64)


# ------------------------------------------------ what a run's records say (runs: report.load_run)
PAPER_SPLIT = {"generation": 71.8, "reward": 0.1, "training": 28.1}  # Table 1, % of an iteration
PHASES = ("generation", "reward", "reference", "training")


def final(run: dict) -> dict[str, float]:
    """The numbers compared across groups, after the run's last iteration."""
    last = run["iters"][-1]
    return {
        "held-out reward": last["eval.reward"],
        "win score": last["eval.win_score"],
        "tokens generated": last["total.tokens_generated"],
        "seconds": sum(sum(i[f"seconds.{p}"] for p in PHASES) for i in run["iters"]),
    }


def curves(runs: list[dict], metric: str) -> np.ndarray:
    """[seeds, iterations + 1]: the metric before training, then after each iteration."""
    return np.array([[r["initial"][metric]] + [i[metric] for i in r["iters"]] for r in runs])


def cumulative(runs: list[dict], total: str) -> np.ndarray:
    """[seeds, iterations + 1] running total of a cost (0 before the first iteration)."""
    return np.array([[0.0] + [i[f"total.{total}"] for i in r["iters"]] for r in runs])


def phase_split(runs: list[dict]) -> dict[str, float]:
    totals = {p: sum(i[f"seconds.{p}"] for r in runs for i in r["iters"][1:] or r["iters"])
              for p in PHASES}
    whole = sum(totals.values()) or 1.0
    return {p: 100.0 * v / whole for p, v in totals.items()}


def frontier_points(run: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(KL to π_0 per token, held-out reward) before training and after each iteration."""
    records = [run["initial"], *run["iters"]]
    if any(r.get("eval.kl_initial") is None for r in records):
        return None
    return (np.array([r["eval.kl_initial"] for r in records]),
            np.array([r["eval.reward"] for r in records]))


def gain_split(runs: list[dict]) -> dict[str, np.ndarray] | None:
    """`reward_history.gain_split` of each run with a history, averaged over them (NaN-aware)
    over the iterations they all have, with "seeds"; None without any."""
    splits = [reward_history.gain_split(r["history"]["chosen"]) for r in runs
              if r["history"] is not None and len(r["history"]["chosen"]) > 1]
    if not splits:
        return None
    q = min(len(s["iteration"]) for s in splits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column of NaN (no gain): NaN
        out = {k: np.nanmean([s[k][:q] for s in splits], axis=0) for k in splits[0]}
    return {**out, "iteration": splits[0]["iteration"][:q], "seeds": len(splits)}

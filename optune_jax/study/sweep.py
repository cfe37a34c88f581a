"""`python -m optune_jax.study.sweep --config FILE --rho 0.3 0.5 0.7 1.0 --selection reward random
--seeds 0 1 --out runs/rho_study`: the paper's ρ study (Fig. 3 and 5) as one resumable job.

Variants that are not a grid: `--variant "optune.rho=0.5 optune.selection=random"` (repeatable,
instead of --rho/--selection), each a list of KEY=VALUE overrides, crossed with --seeds; the run
directory is named after the overrides (`rho0.5_selection-random_seed0`).

A seed pairs the variants: with the same `run.seed`, every variant starts from the same π_0
(a random model is initialized from the seed), holds out the same prompts (eval_files, or a
split seeded by it), draws the same iteration-0 samples (every prompt is generated at t = 0;
each draw's key is folded from the seed, the iteration and the prompt's index, not its batch)
and evaluates with the same keys, as long as the overrides leave the data and sampling alone.

A seed's variants evaluate π_0 once: the first run keeps its evaluation in `<out>/.initial_eval`
and the others read it (`eval.initial_cache`; keyed by everything it depends on, so a variant
that changes the data, sampling or model evaluates afresh).

Runs the variants one after another in this process (JAX scales out through its mesh, not
through a process pool). A variant whose run directory is complete is skipped; a cut one
resumes from its newest checkpoint, so re-running the same command finishes the sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from optune_jax import train


def variant_name(rho: float, selection: str, seed: int) -> str:
    return f"rho{rho:g}_{selection}_seed{seed}"


def override_name(sets: list[str]) -> str:
    """A directory name from KEY=VALUE overrides: "optune.rho=0.5 loss.name=dpo" ->
    "rho0.5_name-dpo" (numbers follow the key's last part, words after a dash)."""
    parts = []
    for item in sets:
        key, _, value = item.partition("=")
        leaf = key.rsplit(".", 1)[-1]
        try:
            float(value)
            parts.append(f"{leaf}{value}")
        except ValueError:
            parts.append(f"{leaf}-{value}")
    return "_".join(parts).replace("/", "-").replace(" ", "")


def parse_variant(text: str) -> list[str]:
    """'optune.rho=0.5 optune.selection=random' -> its overrides; ValueError unless every
    item is KEY=VALUE with a dotted key and run.seed / run.output_dir are left to the sweep."""
    sets = text.split()
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or "." not in key or not value:
            raise ValueError(f"--variant {text!r}: expected KEY=VALUE items, got {item!r}")
        if key in ("run.seed", "run.output_dir"):
            raise ValueError(f"--variant {text!r}: {key} is set by the sweep (--seeds, --out)")
    if not sets:
        raise ValueError("--variant: empty")
    return sets


def variants_from(specs: list[str], seeds) -> list[tuple[str, list[str]]]:
    """(name, overrides) per --variant and seed; ValueError for a bad or repeated variant."""
    parsed = [parse_variant(s) for s in specs]
    names = [override_name(sets) for sets in parsed]
    repeated = {n for n in names if names.count(n) > 1}
    if repeated:
        raise ValueError(f"--variant: the same variant twice: {', '.join(sorted(repeated))}")
    return [(f"{name}_seed{seed}", [*sets, f"run.seed={seed}"])
            for seed in seeds for name, sets in zip(names, parsed, strict=True)]


def variants(rhos, selections, seeds):
    """(name, overrides) per variant; ρ = 1 regenerates everything, so selection is moot."""
    out = []
    for seed in seeds:
        for rho in rhos:
            for selection in (["reward"] if rho == 1.0 else selections):
                sets = [f"optune.rho={rho}", f"optune.selection={selection}", f"run.seed={seed}"]
                out.append((variant_name(rho, selection, seed), sets))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m optune_jax.study.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rho", type=float, nargs="+", help="default: 0.3 0.5 0.7 1.0")
    p.add_argument("--selection", nargs="+", choices=["reward", "random"],
                   help="default: reward random")
    p.add_argument("--variant", action="append", default=[], metavar='"KEY=VALUE ..."',
                   help="one variant's overrides (repeatable; instead of --rho/--selection)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", required=True, help="directory that receives one run per variant")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    if args.variant and (args.rho or args.selection):
        print("error: --variant replaces --rho/--selection; give one or the other",
              file=sys.stderr)
        return 2
    try:
        todo = (variants_from(args.variant, args.seeds) if args.variant else
                variants(args.rho or [0.3, 0.5, 0.7, 1.0], args.selection or ["reward", "random"],
                         args.seeds))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # π_0's evaluation once per seed, not per variant (unless --set says otherwise)
    cache = f"eval.initial_cache={Path(args.out) / '.initial_eval'}"
    for i, (name, sets) in enumerate(todo):
        out = Path(args.out) / name
        if (out / "summary.md").exists():
            print(f"[{i + 1}/{len(todo)}] {name}: done, skipped")
            continue
        print(f"[{i + 1}/{len(todo)}] {name}")
        argv = ["--config", args.config, "--auto-resume", "--no-export"]
        for kv in [cache, *args.overrides, *sets, f"run.output_dir={out}"]:
            argv += ["--set", kv]
        if args.no_progress:
            argv.append("--no-progress")
        code = train.main(argv)  # the command line's own driver: a variant runs as it would alone
        if code:
            return code
    print(f"report: python -m optune_jax.study.report {args.out}/*")
    return 0


if __name__ == "__main__":
    sys.exit(main())

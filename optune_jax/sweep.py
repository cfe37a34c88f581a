"""`python -m optune_jax.sweep --config FILE --rho 0.3 0.5 0.7 1.0 --selection reward random
--seeds 0 1 --out runs/rho_study`: the paper's ρ study (Fig. 3 and 5) as one resumable job.

Runs the variants one after another in this process (JAX scales out through its mesh, not
through a process pool). A variant whose run directory is complete is skipped; a cut one
resumes from its newest checkpoint, so re-running the same command finishes the sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from optune_jax.config import load_config
from optune_jax.errors import ConfigError, RunError


def variant_name(rho: float, selection: str, seed: int) -> str:
    return f"rho{rho:g}_{selection}_seed{seed}"


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
    p = argparse.ArgumentParser(prog="python -m optune_jax.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rho", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0])
    p.add_argument("--selection", nargs="+", default=["reward", "random"],
                   choices=["reward", "random"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", required=True, help="directory that receives one run per variant")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from optune_jax.loop import OptuneRun  # heavy imports after argument parsing

    todo = variants(args.rho, args.selection, args.seeds)
    for i, (name, sets) in enumerate(todo):
        out = Path(args.out) / name
        try:
            cfg = load_config(args.config, [*args.overrides, *sets, f"run.output_dir={out}"])
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if (out / "summary.md").exists():
            print(f"[{i + 1}/{len(todo)}] {name}: done, skipped")
            continue
        print(f"[{i + 1}/{len(todo)}] {name}")
        from optune_jax.cli import report_error, write_summary
        from optune_jax.train import summary_table

        try:
            run = OptuneRun(
                cfg, resume=(out / "config.yaml").exists(), progress=not args.no_progress
            )
            try:
                write_summary(out, summary_table(run.run()))
            finally:
                run.close()
        except (RunError, OSError) as e:  # one line naming the variant's problem, exit code 2
            return report_error(e)
    print(f"report: python -m optune_jax.report {args.out}/*")
    return 0


if __name__ == "__main__":
    sys.exit(main())

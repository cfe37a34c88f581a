"""`python -m optune_jax.train_rm --config FILE [--set key=value ...] [--resume | --overwrite]`."""

from __future__ import annotations

import sys

from optune_jax.config import load_config
from optune_jax.errors import RunError
from optune_jax.train import make_parser, report_error, write_summary


def summary_table(records: list[dict]) -> str:
    """Markdown: held-out pairwise accuracy and loss before and after training."""
    before = next(r for r in records if r["iteration"] == -1)
    after = max(records, key=lambda r: r["iteration"])
    rows = [
        (k, f"{before[f'eval.{k}']:.4f}", f"{after[f'eval.{k}']:.4f}")
        for k in ("accuracy", "loss", "margin")
    ]
    lines = ["| held-out pairs | before | after |", "| --- | --- | --- |"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def main(argv=None) -> int:
    from optune_jax.rm_training import RMConfig  # the schema, for --help and loading

    args = make_parser(
        "python -m optune_jax.train_rm",
        "Train a reward model (Bradley–Terry) on preference pairs, for reward.name=model.",
        RMConfig,
    ).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, schema=RMConfig)
        from optune_jax.rm_training import RewardModelRun

        run = RewardModelRun(
            cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
        )
    except (ValueError, OSError) as e:  # RunError (config, data, output directory) among them
        return report_error(e)
    try:
        table = summary_table(run.run())
        write_summary(run.out, table)
        print(table)
        if not args.no_export:
            print(f"exported transformers reward model: {run.export()}")
    except (RunError, OSError) as e:  # what a user can fix: one line, exit code 2
        return report_error(e)
    finally:
        run.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

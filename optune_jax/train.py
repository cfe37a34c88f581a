"""`python -m optune_jax.train --config FILE [--set key=value ...] [--resume | --overwrite]`."""

from __future__ import annotations

import argparse
import sys

from optune_jax.config import ConfigError, RunConfig, describe_options, load_config


def make_parser(prog: str, description: str, schema: type = RunConfig) -> argparse.ArgumentParser:
    """The trainers' shared command line: --config, --set, --resume | --overwrite, switches."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="config keys (YAML sections; override any with --set section.key=value):\n"
        + describe_options(schema),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.learning_rate=1e-6 (repeatable)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in run.output_dir from its newest complete checkpoint",
    )
    mode.add_argument(
        "--overwrite", action="store_true", help="delete what run.output_dir holds and start afresh"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--no-export", action="store_true", help="skip the transformers export")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return make_parser(
        "python -m optune_jax.train",
        "Online preference tuning with OPTune (reward-based regeneration + wDPO).",
    ).parse_args(argv)


def summary_table(records: list[dict]) -> str:
    """Markdown summary: held-out reward before/after, win score, generation saved."""
    before = next(r for r in records if r["iteration"] == -1)
    iters = sorted((r for r in records if r["iteration"] >= 0), key=lambda r: r["iteration"])
    last = iters[-1]
    regenerated = last["total.prompts_regenerated"]
    everything = iters[0]["prompts_regenerated"] * len(iters)  # what ρ = 1 would regenerate
    saved = 100.0 * (1.0 - regenerated / everything)
    rows = [
        ("held-out reward", f"{before['eval.reward']:.4f}", f"{last['eval.reward']:.4f}"),
        ("win score vs initial policy (SPEC §6)", "50.0", f"{last['eval.win_score']:.1f}"),
        ("prompts regenerated", "", f"{regenerated} of {everything} ({saved:.0f}% saved)"),
        ("tokens generated", "", str(last["total.tokens_generated"])),
        ("generation seconds", "", f"{last['total.generation_seconds']:.1f}"),
    ]
    lines = ["| metric | before | after |", "| --- | --- | --- |"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from optune_jax import distributed  # heavy imports once the config is valid
        from optune_jax.loop import OptuneRun

        d = cfg.distributed
        distributed.initialize(d.coordinator, d.num_processes, d.process_id)
        run = OptuneRun(
            cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
        )
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        records = run.run()
        if distributed.is_primary():
            table = summary_table(records)
            (run.out / "summary.md").write_text(table + "\n")
            print(table)
        if not args.no_export:
            out = run.export()  # every process joins; process 0 writes
            if distributed.is_primary():
                print(f"exported transformers model: {out}")
    finally:
        run.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

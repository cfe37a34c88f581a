"""`python -m optune_jax.train --config FILE [--set key=value ...] [--resume | --overwrite]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from optune_jax.config import RunConfig, describe_options, load_config
from optune_jax.errors import RunError, describe_os_error, file_error


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
    """Markdown summary: held-out reward and drift from π_0 before/after, win score, generation
    saved, and the greedy answers to the first held-out prompts before and after tuning."""
    before = next(r for r in records if r["iteration"] == -1)
    iters = sorted((r for r in records if r["iteration"] >= 0), key=lambda r: r["iteration"])
    last = iters[-1]
    regenerated = last["total.prompts_regenerated"]
    everything = iters[0]["prompts_regenerated"] * len(iters)  # what ρ = 1 would regenerate
    saved = 100.0 * (1.0 - regenerated / everything) if everything else 0.0

    def both(key: str, fmt: str) -> tuple[str, str]:
        return tuple(
            "n/a" if r.get(key) is None else format(r[key], fmt) for r in (before, last)
        )

    rows = [
        ("held-out reward", *both("eval.reward", ".4f")),
        ("win score vs initial policy (SPEC §6)", "50.0", f"{last['eval.win_score']:.1f}"),
    ]
    if "eval.kl_initial" in last:  # eval.drift
        rows += [
            ("KL(π_t ‖ π_0) per token, on samples", *both("eval.kl_initial", ".3f")),
            ("NLL under π_0 of greedy answers, nats/token", *both("eval.nll_initial", ".3f")),
            ("greedy answers ending with EOS", *both("eval.greedy_eos_rate", ".0%")),
            ("greedy answer length, tokens", *both("eval.greedy_tokens", ".1f")),
            ("repeated 4-grams in greedy answers (seq-rep-4)", *both("eval.greedy_rep4", ".3f")),
        ]
    rows += [
        ("samples ending with EOS", *both("eval.eos_rate", ".0%")),
        ("sample length, tokens", *both("eval.response_tokens", ".1f")),
        ("prompts regenerated", "", f"{regenerated} of {everything} ({saved:.0f}% saved)"),
        ("tokens generated", "", str(last["total.tokens_generated"])),
        ("generation seconds", "", f"{last['total.generation_seconds']:.1f}"),
    ]
    lines = ["| metric | before | after |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    examples = zip(before.get("eval.examples") or [], last.get("eval.examples") or [], strict=False)
    for i, (old, new) in enumerate(examples):
        if i == 0:
            lines += ["", "Greedy answers to held-out prompts, initial policy and tuned policy:"]
        lines += ["", f"**{old['prompt']}**", "", "| before | after |", "| --- | --- |",
                  f"| {_cell(old['answer'])} | {_cell(new['answer'])} |"]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """`text` inside one Markdown table cell (pipes escaped, line breaks kept as <br>)."""
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def report_error(error: Exception) -> int:
    """Prints `error` as the one line a user reads (a bare OSError with its path and cause);
    returns the exit code 2."""
    message = str(error)
    if isinstance(error, OSError):
        message = f"{error.filename or 'a file'}: {describe_os_error(error)}"
    print(f"error: {message}", file=sys.stderr)
    return 2


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
    except (ValueError, OSError) as e:  # RunError (config, data, output directory) among them
        return report_error(e)
    try:
        if distributed.is_primary():
            print(run.describe_data())
        records = run.run()
        if distributed.is_primary():
            table = summary_table(records)
            write_summary(run.out, table)
            print(table)
        if not args.no_export:
            out = run.export()  # every process joins; process 0 writes
            if distributed.is_primary():
                print(f"exported transformers model: {out}")
    except (RunError, OSError) as e:  # what a user can fix: one line, exit code 2
        return report_error(e)
    finally:
        run.close()
    return 0


def write_summary(out: Path, table: str) -> None:
    """`out/summary.md`, written whole or not at all (RunError naming the file and cause)."""
    path = out / "summary.md"
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(table + "\n")
        tmp.replace(path)
    except OSError as e:
        raise file_error("write", path, e) from None


if __name__ == "__main__":
    sys.exit(main())

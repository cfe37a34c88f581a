"""`python -m optune_jax.train_rm --config FILE [--set key=value ...] [--resume | --overwrite]`."""

from __future__ import annotations

import sys

from optune_jax.run.cli import Trainer
from optune_jax.run.schema import RMConfig


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


def make_run(cfg: RMConfig, **kw):
    """The run `cfg` describes (`rewards.rm_trainer.RewardModelRun`; JAX loads once the config
    is valid)."""
    from optune_jax.rewards.rm_trainer import RewardModelRun

    return RewardModelRun(cfg, **kw)


TRAINER = Trainer(
    "python -m optune_jax.train_rm",
    "Train a reward model (Bradley–Terry) on preference pairs, for reward.name=model.",
    RMConfig, make_run, summary_table, "transformers reward model",
)

main = TRAINER.main

if __name__ == "__main__":
    sys.exit(main())

"""How often a learned reward ranks held-out pairs as the IFEval verifier does.

Scores both sides of every pair through the loop's own reward path (`reward: {name: model}`,
optune_jax.rewards.learned.ModelReward) and reports the agreement (chosen scored strictly higher)
overall and by the constraint family the rejected response misses.
Usage: python scripts/rm_agreement.py [--model runs/rm_ifeval/model]
       [--pairs data/rm_ifeval/heldout.jsonl] [--out docs/results/rm_agreement.md]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from optune_jax.rewards.learned import ModelReward


def agreement_table(pairs: list[dict], chosen: np.ndarray, rejected: np.ndarray) -> str:
    agree = chosen > rejected
    groups = defaultdict(list)
    for pair, ok in zip(pairs, agree, strict=True):
        key = pair["missed"][0] if len(pair["missed"]) == 1 else "several (vs a single miss)"
        groups[key].append(ok)
    lines = ["| rejected response misses | pairs | agreement |", "| --- | --- | --- |"]
    lines += [f"| {k} | {len(v)} | {np.mean(v):.3f} |" for k, v in sorted(groups.items())]
    lines.append(f"| **all** | **{len(agree)}** | **{np.mean(agree):.3f}** |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/rm_ifeval/model")
    p.add_argument("--pairs", default="data/rm_ifeval/heldout.jsonl")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args()
    pairs = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line]
    reward = ModelReward(args.model)
    chosen = reward(pairs, [r["chosen"] for r in pairs])
    rejected = reward(pairs, [r["rejected"] for r in pairs])
    table = agreement_table(pairs, chosen, rejected)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()

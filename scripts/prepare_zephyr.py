"""Ready the OPTune paper's setting (design §7, configs/zephyr_7b_optune.yaml) from local
downloads.

Writes the prompt file (48k UltraChat prompts drawn with a fixed seed, the paper's §4.1) and
checks the policy and reward-model directories; then prints the command that trains with them.
Nothing is downloaded: on a machine with the hub, fetch first (docs/scaling.md, "The paper's
setting: what to download"):

    huggingface-cli download HuggingFaceH4/ultrachat_200k --repo-type dataset --local-dir U
    huggingface-cli download HuggingFaceH4/zephyr-7b-sft-full --local-dir P
    huggingface-cli download <a Mistral-7B reward model, e.g. Xiong et al.'s> --local-dir R

Usage: python scripts/prepare_zephyr.py --ultrachat U --policy P --reward-model R
           [--split train_gen] [--num-prompts 48000] [--seed 0] [--out data/ultrachat/prompts.jsonl]
Stops with one line naming what is missing or wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from optune_jax.data import read_table

CONFIG = "configs/zephyr_7b_optune.yaml"


class Missing(Exception):
    """What the user must provide, in one line."""


def ultrachat_files(root: Path, split: str) -> list[Path]:
    """The split's parquet shards of a local HuggingFaceH4/ultrachat_200k download."""
    if not root.is_dir():
        raise Missing(f"--ultrachat {root}: no such directory (a download of "
                      "HuggingFaceH4/ultrachat_200k)")
    files = sorted(root.glob(f"**/{split}-*.parquet"))
    if not files:
        found = sorted({p.name.split("-")[0] for p in root.glob("**/*.parquet")})
        raise Missing(f"--ultrachat {root}: no {split}-*.parquet shard; splits found: "
                      f"{', '.join(found) or 'none'}")
    return files


def sample_prompts(files: list[Path], num: int, seed: int) -> list[dict]:
    """`num` distinct prompts (first user turn, empty ones skipped) drawn without replacement
    with `seed`, in the order drawn: the paper's fixed random 48k subset."""
    prompts: dict[str, None] = {}  # distinct, in file order
    for f in files:
        table = read_table(str(f))
        for row in table.rows:
            text = row.get("prompt")
            if isinstance(text, str) and text.strip():
                prompts.setdefault(text.strip())
    texts = list(prompts)
    if len(texts) < num:
        raise Missing(f"--num-prompts {num}: the split holds only {len(texts)} distinct prompts")
    pick = np.random.default_rng(seed).choice(len(texts), size=num, replace=False)
    return [{"prompt": texts[i]} for i in pick]


def checkpoint_dir(path: Path, flag: str, *, classifier: bool) -> Path:
    """A transformers checkpoint directory: a causal LM (`classifier` False) or a
    sequence-classification model with one label (the reward model)."""
    config = path / "config.json"
    if not config.is_file():
        raise Missing(f"{flag} {path}: no config.json (a transformers checkpoint directory)")
    meta = json.loads(config.read_text())
    arch = " ".join(meta.get("architectures") or ["?"])
    labels = meta.get("num_labels", len(meta.get("id2label") or {0: 0}))
    if classifier and ("ForSequenceClassification" not in arch or labels != 1):
        raise Missing(f"{flag} {path}: architecture {arch} with {labels} labels; a reward model "
                      "is *ForSequenceClassification with num_labels 1")
    if not classifier and "ForCausalLM" not in arch:
        raise Missing(f"{flag} {path}: architecture {arch}; the policy is a *ForCausalLM")
    if not any(path.glob("*.safetensors")):
        raise Missing(f"{flag} {path}: no *.safetensors weights")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ultrachat", type=Path, required=True)
    p.add_argument("--policy", type=Path, required=True)
    p.add_argument("--reward-model", type=Path, required=True)
    p.add_argument("--split", default="train_gen")
    p.add_argument("--num-prompts", type=int, default=48_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("data/ultrachat/prompts.jsonl"))
    args = p.parse_args(argv)
    try:
        policy = checkpoint_dir(args.policy, "--policy", classifier=False)
        reward = checkpoint_dir(args.reward_model, "--reward-model", classifier=True)
        rows = sample_prompts(ultrachat_files(args.ultrachat, args.split), args.num_prompts,
                              args.seed)
    except Missing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".partial")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(args.out)  # never a half-written prompt file
    print(f"wrote {len(rows)} prompts to {args.out}")
    print("train with:\n  python -m optune_jax.train --config " + CONFIG
          + f" --set model.checkpoint={policy} --set reward.path={reward}"
          + f" --set data.train_files=[{args.out}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Held-out reward of the base model and exported models, precisely: every held-out prompt, several
samples each, the same draws' seeds for every model (paired), per constraint family.

Usage: python scripts/heldout.py MODEL_DIR [MODEL_DIR ...] [--config FILE] [--samples 4] [--seed 7]
                                 [--set section.key=value ...] [--json FILE]

The run's own evaluation scores one sample of each of `data.num_eval_prompts` prompts (the main
job: 48, a standard error of about 0.035 on the mean reward); this one scores `--samples`
samples of every held-out prompt (160 x 4: about 0.018) with the config's `sampling.*`
settings, and the difference to the base model per prompt, with a 95 % confidence interval
(1.96 standard errors over prompts). The base is the config's `model.checkpoint`; each
MODEL_DIR is a run's exported `model/`. Rewards are the config's reward (no missing-EOS
penalty, as in the run's evaluation).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optune_jax import prompts  # noqa: E402
from optune_jax.components import build_layout, load_policy  # noqa: E402
from optune_jax.evaluate import mean_ci95  # noqa: E402
from optune_jax.generate import Generator  # noqa: E402
from optune_jax.rewards import functions as rewards
from optune_jax.rewards import ifeval
from optune_jax.run.config_file import load_config  # noqa: E402
from optune_jax.run.errors import ConfigError  # noqa: E402
from optune_jax.scoring import ResponseScorer  # noqa: E402


def evaluate(cfg, checkpoint: str, samples: int, seed: int) -> dict:
    """Rewards [N, S], EOS, lengths and per-family satisfaction of `checkpoint`'s samples."""
    layout = build_layout(cfg.mesh)
    policy, params = load_policy(cfg, layout)
    _, held_out = prompts.load_prompts(cfg, policy.tokenizer, pair_files=False)
    generate = Generator(cfg.sampling, policy, layout, cfg.model.dtype,
                         cfg.data.max_prompt_tokens, progress=True)
    score = ResponseScorer(cfg.reward.name, policy.tokenizer, rewards.make_reward(cfg.reward))
    start = time.perf_counter()
    gen = generate(params, held_out.ids, np.arange(len(held_out.ids)), seed=seed, iteration=0,
                   num_samples=samples, desc=checkpoint, prefix=held_out.prefix)
    rewards_NS = score(held_out.rows, gen.tokens, gen.lengths)
    n, s = gen.lengths.shape
    texts = score.texts(gen.tokens.reshape(n * s, -1), gen.lengths.reshape(-1))
    families = collections.defaultdict(list)
    if cfg.reward.name == "ifeval":
        for i, row in enumerate(held_out.rows):
            for text in texts[i * s:(i + 1) * s]:
                for c in row["constraints"]:
                    families[c["type"]].append(ifeval.constraint_miss(c, text) == 0.0)
    return dict(
        checkpoint=checkpoint,
        rewards=rewards_NS,
        eos=float(np.mean(gen.finished)),
        tokens=float(np.mean(gen.lengths)),
        seconds=time.perf_counter() - start,
        families={k: float(np.mean(v)) for k, v in sorted(families.items())},
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/heldout.py",
                                description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="exported model directories")
    p.add_argument("--config", default="configs/smollm2_ifeval.yaml")
    p.add_argument("--samples", type=int, default=4, help="samples per held-out prompt")
    p.add_argument("--seed", type=int, default=7, help="the draws' seed, the same for every model")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override, as in optune_jax.train (repeatable)")
    p.add_argument("--json", type=Path, help="also write the figures (and per-prompt means) here")
    args = p.parse_args(argv)
    for m in args.models:
        if not (m / "config.json").is_file():
            print(f"error: {m} holds no exported model (config.json); expected a run's model/",
                  file=sys.stderr)
            return 2
    if args.json and not args.json.parent.is_dir():
        print(f"error: --json {args.json}: no directory {args.json.parent}", file=sys.stderr)
        return 2
    if args.samples < 1:
        print(f"error: --samples {args.samples}; expected at least 1", file=sys.stderr)
        return 2
    overrides = [*args.set, "data.num_eval_prompts=null"]
    try:
        base_cfg = load_config(args.config, overrides)
    except ConfigError as error:  # one line naming the bad value
        print(f"error: {error}", file=sys.stderr)
        return 2
    tokenizer = base_cfg.model.tokenizer or base_cfg.model.checkpoint  # one tokenization for all
    results = [evaluate(base_cfg, base_cfg.model.checkpoint, args.samples, args.seed)]
    for m in args.models:
        cfg = load_config(args.config, [*overrides, f"model.checkpoint={m}",
                                        f"model.tokenizer={tokenizer}"])
        results.append(evaluate(cfg, str(m), args.samples, args.seed))

    base = results[0]["rewards"].mean(1)
    n = len(base)
    print(f"\n{n} held-out prompts x {args.samples} samples (seed {args.seed}), {args.config}\n")
    print("| model | reward (95 % CI) | vs base, paired (95 % CI) | EOS | tokens | s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        mean = r["rewards"].mean(1)
        diff = mean - base
        vs = "" if r is results[0] else f"{diff.mean():+.3f} ± {mean_ci95(diff):.3f}"
        print(f"| {r['checkpoint']} | {mean.mean():.3f} ± {mean_ci95(mean):.3f} | {vs} | "
              f"{r['eos']:.2f} | {r['tokens']:.1f} | {r['seconds']:.0f} |")
    if results[0]["families"]:
        names = list(results[0]["families"])
        print("\nconstraints satisfied, by family:\n")
        print("| model | " + " | ".join(names) + " |")
        print("| --- " * (len(names) + 1) + "|")
        for r in results:
            print(f"| {r['checkpoint']} | " + " | ".join(f"{r['families'][k]:.3f}" for k in names)
                  + " |")
    if args.json:  # written whole or not at all
        out = [dict(r, rewards=r["rewards"].mean(1).round(4).tolist()) for r in results]
        tmp = args.json.with_name(args.json.name + ".tmp")
        try:
            tmp.write_text(json.dumps(dict(samples=args.samples, seed=args.seed,
                                           config=args.config, results=out), indent=1))
            tmp.replace(args.json)
        except OSError as error:
            print(f"error: cannot write {args.json}: {error.strerror}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

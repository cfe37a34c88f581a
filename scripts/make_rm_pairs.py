"""Write reward-model preference pairs for the IFEval-style task: data/rm_ifeval/*.jsonl.

Responses are SYNTHESISED, not sampled from a policy (sampling SmolLM2 on a 2-core CPU is far
slower; this writes thousands of pairs in seconds): for every prompt of data/ifeval, `compose`
writes a response from a filler vocabulary with a chosen set of the prompt's constraints
deliberately missed (too few words, a missing bullet, an avoided word, commas, capitals, no
closing quotes, ...) and every other constraint met, checked by the verifier. Candidates per
prompt (and per filler variant: 2 for train, 1 for heldout): one meeting every constraint, one
missing each single constraint, and (k >= 2) one missing all of them.
Pairs: the full candidate against each single miss, and each single miss against the all-miss
one; the verifier's reward (optune_jax.rewards.ifeval) picks the chosen side; ties are skipped.

Row: {"id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "missed"}
where `missed` lists the families the rejected response misses beyond the chosen one.
Deterministic for a seed. Usage: python scripts/make_rm_pairs.py [--out-dir data/rm_ifeval]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from optune_jax.rewards.ifeval import constraint_miss, prompt_reward

FILLER = (
    "the a one our your this that it we you they people day way place room road park garden "
    "window table book cup coffee tea bread light rain sun wind tree leaf river hill town city "
    "street shop market friend family child dog cat bird music song story plan habit job task "
    "list note letter email money budget sleep food meal walk run trip bag shoe coat map time "
    "hour week year season morning evening night is are was feels looks sounds makes keeps "
    "brings gives takes helps moves stays grows turns starts ends opens slowly gently softly "
    "quickly often usually and but so then with without under over near around through after "
    "before during warm cool bright soft quiet busy clean small little old new green blue "
    "golden careful steady patient curious simple easy clear"
).split()
# split -> (prompts, variants): independent filler draws per prompt; more for training, so the
# model sees each constraint with varied text instead of memorising one response per prompt
SPLITS = {"train": ("data/ifeval/train.jsonl", 2), "heldout": ("data/ifeval/heldout.jsonl", 1)}
ATTEMPTS = 50


def _word_target(by: dict, broken: set, rng: random.Random, floor: int) -> int:
    wc = by.get("word_count")
    if wc is None:
        return max(floor, rng.randint(25, 70))
    lo, hi = wc.get("min_words"), wc.get("max_words")
    if "word_count" in broken:  # below the minimum or above the maximum
        sides = ([("below", lo)] if lo and lo > floor + 4 else []) + ([("above", hi)] if hi else [])
        side, bound = rng.choice(sides or [("above", hi or 2 * lo)])
        return (
            rng.randint(floor, bound - 3)
            if side == "below"
            else rng.randint(bound + 5, bound * 3 // 2 + 6)
        )
    low = max(lo or 0, floor)
    return rng.randint(low + 1, (hi - 1) if hi else low + 40)


def _blocks(by: dict, broken: set, rng: random.Random) -> tuple[int, str]:
    """(number of blocks, kind): bullets or paragraphs, off by one when that family is missed."""
    for family in ("bullets", "paragraphs"):
        if family in by:
            n = by[family]["n"]
            if family in broken:
                n = n + 1 if n == 1 or rng.random() < 0.5 else n - 1
            return n, family
    return rng.choice((1, 1, 2)), "paragraphs"


def compose(row: dict, broken: set, rng: random.Random) -> str:
    """A response meeting every constraint of `row` except the families in `broken`."""
    by = {c["type"]: c for c in row["constraints"]}
    avoid = set(by.get("avoid_words", {}).get("words", []))
    vocab = [w for w in FILLER if w not in avoid]
    n_blocks, kind = _blocks(by, broken, rng)
    words = [rng.choice(vocab) for _ in range(_word_target(by, broken, rng, floor=5 * n_blocks))]
    if "include_words" in by:
        required = list(by["include_words"]["words"])
        if "include_words" in broken:
            required.pop(rng.randrange(len(required)))
        for w in required:
            words.insert(rng.randrange(1, len(words)), w)
        words = words[: len(words) - len(required)] if "word_count" in by else words
    if "avoid_words" in broken:
        words[rng.randrange(1, len(words))] = rng.choice(sorted(avoid))
    if "start_word" in by:
        start = by["start_word"]["word"]
        words[0] = start if "start_word" not in broken else rng.choice(vocab)
    if "end_phrase" in by:
        phrase = by["end_phrase"]["phrase"].split()
        tail = phrase if "end_phrase" not in broken else phrase + rng.sample(vocab, 3)
        if "end_phrase" in broken and rng.random() < 0.5:
            tail = rng.sample(vocab, len(phrase))  # the phrase left out
        words = words[: len(words) - len(tail)] + tail
    # split into blocks, blocks into sentences
    cuts = sorted(rng.sample(range(4, len(words) - 3), n_blocks - 1)) if n_blocks > 1 else []
    blocks = [words[a:b] for a, b in zip([0, *cuts], [*cuts, len(words)], strict=True)]
    lowercase = "lowercase" in by and "lowercase" not in broken
    commas = "no_commas" in broken or ("no_commas" not in by and rng.random() < 0.6)
    rendered = []
    for block in blocks:
        sentences, i = [], 0
        while i < len(block):
            n = rng.randint(5, 11)
            s = list(block[i : i + n])
            if commas and len(s) > 4 and rng.random() < 0.6:
                s[rng.randrange(1, len(s) - 2)] += ","
            text = " ".join(s)
            sentences.append((text if lowercase else text[0].upper() + text[1:]) + ".")
            i += n
        line = " ".join(sentences)
        rendered.append(f"{rng.choice('-*')} {line}" if kind == "bullets" else line)
    text = ("\n" if kind == "bullets" else "\n\n").join(rendered)
    text = text.lower() if lowercase else text
    if "quotes" in by:
        text = f'"{text}"' if "quotes" not in broken else rng.choice((text, f'"{text}'))
    return text


def candidate(row: dict, broken: set, seed: str) -> str | None:
    """A composed response that misses exactly the `broken` families (None if none found)."""
    for attempt in range(ATTEMPTS):
        text = compose(row, broken, random.Random(f"{seed}-{row['id']}-{attempt}"))
        missed = {c["type"] for c in row["constraints"] if constraint_miss(c, text) > 0}
        if missed == broken:
            return text
    return None


def pairs_for(row: dict, seed: str) -> list[dict]:
    families = [c["type"] for c in row["constraints"]]
    sets = [set()] + [{f} for f in families] + ([set(families)] if len(families) > 1 else [])
    texts = {frozenset(s): candidate(row, s, seed) for s in sets}
    texts = {k: v for k, v in texts.items() if v is not None}
    full, everything = frozenset(), frozenset(families)
    links = [(full, frozenset({f})) for f in families]
    if len(families) > 1:
        links += [(frozenset({f}), everything) for f in families]
    out = []
    for a, b in links:
        if a not in texts or b not in texts:
            continue
        ra, rb = (prompt_reward(row["constraints"], texts[k]) for k in (a, b))
        if ra == rb:
            continue
        (c, rc), (r, rr) = sorted([(a, ra), (b, rb)], key=lambda x: -x[1])
        out.append({
            "id": f"{row['id']}-{seed}-{len(out)}", "prompt": row["prompt"], "chosen": texts[c],
            "rejected": texts[r], "chosen_reward": rc, "rejected_reward": rr,
            "missed": sorted(r - c),
        })  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="data/rm_ifeval")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, (source, variants) in SPLITS.items():
        rows = [json.loads(line) for line in Path(source).read_text().splitlines() if line]
        seeds = [f"{args.seed}.{v}" for v in range(variants)]
        pairs = [pair for s in seeds for row in rows for pair in pairs_for(row, s)]
        with (out / f"{split}.jsonl").open("w") as f:
            f.writelines(json.dumps(pair) + "\n" for pair in pairs)
        print(f"{split}: {len(pairs)} pairs from {len(rows)} prompts -> {out / split}.jsonl")


if __name__ == "__main__":
    main()

"""Write the project's IFEval-style prompt set: data/ifeval/{train,heldout}.jsonl and README.md.

Deterministic for a given seed. Held-out prompts use base instructions the training prompts never
use. Each row: {"id", "prompt", "constraints": [{"type", ...params}], "base"}; the verifiers and
the reward live in optune_jax/rewards/ifeval.py.
Usage: python scripts/make_ifeval_data.py [--out-dir data/ifeval] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

NUM_TRAIN, NUM_HELDOUT = 640, 160

TRAIN_BASES = [
    "Describe a quiet morning in a small town.",
    "Describe your ideal weekend.",
    "Describe the smell of fresh bread.",
    "Describe a busy train station at rush hour.",
    "Describe a walk along the beach at sunset.",
    "Describe a favorite childhood toy.",
    "Describe what a farmers market looks like.",
    "Describe the view from the top of a hill.",
    "Describe a rainy afternoon at home.",
    "Describe a well organized kitchen.",
    "Describe how autumn changes a park.",
    "Describe a cozy reading corner.",
    "Describe the first day at a new job.",
    "Describe a friendly neighborhood cafe.",
    "Describe a city at night.",
    "Describe a perfect picnic spot.",
    "Give advice on keeping a houseplant alive.",
    "Give advice on saving money each month.",
    "Give advice on getting better sleep.",
    "Give advice on preparing for a job interview.",
    "Give advice on learning a new language.",
    "Give advice on staying focused while studying.",
    "Give advice on making friends in a new city.",
    "Give advice on packing for a short trip.",
    "Give advice on starting a running habit.",
    "Give advice on cooking for one person.",
    "Give advice on keeping a tidy desk.",
    "Give advice on calming a nervous friend.",
    "Give advice on caring for a new puppy.",
    "Give advice on planning a birthday party.",
    "Give advice on writing a clear email.",
    "Give advice on drinking less coffee.",
    "Explain how a rainbow forms.",
    "Explain why the sky is blue.",
    "Explain how a bicycle stays upright.",
    "Explain what a budget is and why it helps.",
    "Explain how bees make honey.",
    "Explain why people yawn.",
    "Explain how a refrigerator keeps food cold.",
    "Explain what causes the seasons.",
    "Explain how recycling works.",
    "Explain why exercise is good for the heart.",
    "Explain how a library organizes its books.",
    "Explain what a volcano is.",
    "Explain how plants drink water.",
    "Explain why bread rises.",
    "Explain how a compass works.",
    "Explain why the moon changes shape.",
    "Write a short note about a favorite season.",
    "Write a short note thanking a neighbor for help.",
    "Write a short note reminding a friend about dinner.",
    "Write a short note about why you enjoy walking.",
    "Write a short note to a teacher who helped you.",
    "Write a short note about a book you liked.",
    "Write a short note welcoming a new coworker.",
    "Write a short note about a memorable meal.",
    "Write a short note apologizing for being late.",
    "Write a short note about the value of patience.",
    "Tell me about the benefits of drinking water.",
    "Tell me about a hobby that is easy to start.",
    "Tell me how to plan a picnic.",
    "Tell me about the life of a lighthouse keeper.",
    "Tell me why people keep journals.",
    "Tell me about your favorite kind of weather.",
    "Suggest a few ways to relax after work.",
    "Suggest ideas for a rainy day with children.",
    "Suggest a simple breakfast for a busy morning.",
    "Suggest ways to reduce screen time.",
    "Suggest a plan for cleaning a messy garage.",
    "Suggest ways to be kind to strangers.",
    "Suggest a weekend project for a beginner.",
    "Summarize why sleep matters for health.",
    "Summarize the steps to brew a cup of tea.",
    "Summarize what makes a good team.",
    "Compare cats and dogs as pets.",
    "Compare reading a book with watching its movie.",
    "Compare city life and country life.",
    "Compare walking and cycling to work.",
    "List what you need for a camping trip.",
    "List some healthy snacks for school.",
    "Share tips for a long car ride.",
    "Share tips for keeping a garden healthy.",
    "Share tips for a first visit to a museum.",
    "Share tips for staying warm in winter.",
    "Share tips for speaking in public.",
    "Offer encouragement to someone learning to swim.",
    "Offer encouragement to a student before an exam.",
    "Write a short story about a lost umbrella.",
    "Write a short story about a cat who loves music.",
    "Write a short story about a kind stranger.",
    "Write a product description for a reusable water bottle.",
    "Write a product description for a comfortable chair.",
    "Write a short review of a neighborhood bakery.",
    "Write a short review of a walking trail.",
    "Write a message inviting friends to a board game night.",
    "Write a message congratulating a friend on a new home.",
    "Imagine a day without electricity and describe it.",
    "Imagine you are a tree and describe your day.",
    "Recommend a routine for a calm evening.",
    "Recommend a few easy exercises for beginners.",
    "Argue that everyone should learn to cook.",
    "Argue for the benefits of public libraries.",
    "Teach a child how to tie their shoes.",
    "Teach a beginner how to make a paper airplane.",
    "Plan a simple vegetarian dinner for four people.",
    "Describe how to make a good sandwich.",
]

HELDOUT_BASES = [
    "Describe a snowy street early in the morning.",
    "Describe a crowded outdoor concert.",
    "Describe the sound of a thunderstorm.",
    "Describe a small fishing village.",
    "Describe a garden after the rain.",
    "Give advice on handling a disagreement with a roommate.",
    "Give advice on choosing a first bicycle.",
    "Give advice on keeping a weekly schedule.",
    "Give advice on visiting a foreign country for the first time.",
    "Give advice on keeping a car clean.",
    "Explain how a rain gauge measures rainfall.",
    "Explain why leaves change color in the fall.",
    "Explain how a clock keeps time.",
    "Explain what makes a good password.",
    "Explain how a bridge carries weight.",
    "Explain how a seed becomes a plant.",
    "Write a short note about a favorite song.",
    "Write a short note asking a friend to water your plants.",
    "Write a short note about learning from mistakes.",
    "Tell me about the history of kites.",
    "Tell me how to care for a fish tank.",
    "Suggest ways to make a small room feel bigger.",
    "Suggest a fun activity for a family reunion.",
    "Compare tea and coffee.",
    "Compare summer and winter holidays.",
    "Share tips for baking cookies.",
    "Share tips for setting up a quiet study space.",
    "Write a short story about a robot who plants flowers.",
    "Write a product description for a warm blanket.",
    "Write a message welcoming a new neighbor.",
    "Recommend a morning routine for a student.",
    "Teach a beginner how to fold a shirt.",
    "Imagine you live on a boat and describe a normal day.",
    "Argue for the value of taking breaks at work.",
    "Summarize how to prepare for a storm.",
    "Offer encouragement to a friend starting a new job.",
]

FAMILIES = (
    "lowercase", "word_count", "include_words", "avoid_words", "end_phrase",
    "bullets", "no_commas", "start_word", "quotes", "paragraphs",
)  # fmt: skip
# Pairs that cannot hold together (or whose interaction would be unclear to the model).
INCOMPATIBLE = {
    frozenset({"quotes", "bullets"}),  # the opening quote would hide the first bullet marker
    frozenset({"quotes", "end_phrase"}),  # the closing quote would follow the phrase
    frozenset({"bullets", "paragraphs"}),  # a bullet list blurs the paragraph count
}
# Families that a one-word answer satisfies; every prompt also has one that needs content.
VACUOUS = {"lowercase", "no_commas", "avoid_words"}

INCLUDE_WORDS = [
    "simple", "friend", "morning", "water", "light", "home", "quiet", "plan", "small", "time",
    "together", "careful", "happy", "step", "fresh", "change", "space", "kind", "open", "calm",
]  # fmt: skip
AVOID_WORDS = [
    "very", "really", "just", "thing", "good", "important", "also", "basically", "actually",
    "maybe", "lot", "great", "nice", "always",
]  # fmt: skip
END_PHRASES = [
    "hope this helps", "that is all for now", "thank you for reading", "have a great day",
    "good luck", "let me know what you think", "see you soon", "stay curious", "take care",
    "enjoy every moment",
]  # fmt: skip
START_WORDS = [
    "Honestly", "First", "Today", "Imagine", "Yes", "Sure", "Well", "Remember", "Here", "Once",
    "Picture", "Listen",
]  # fmt: skip
MIN_WORDS = [20, 30, 40, 50, 60, 80]
MAX_WORDS = [30, 40, 50, 60, 80, 100]
BETWEEN_WORDS = [(20, 40), (25, 50), (30, 60), (40, 80), (50, 100)]

PHRASES = {
    "lowercase": ["Use only lowercase letters.", "Write everything in lowercase.",
                  "Do not use any capital letters."],
    "min_words": ["Use at least {min_words} words.", "Write at least {min_words} words."],
    "max_words": ["Use at most {max_words} words.", "Keep it to {max_words} words or fewer."],
    "between_words": ["Use between {min_words} and {max_words} words.",
                      "Write {min_words} to {max_words} words."],
    "include_words": ["Include the word{s} {words}.", "Use the word{s} {words}."],
    "avoid_words": ["Do not use the word{s} {words}.", "Avoid the word{s} {words}."],
    "end_phrase": ["End your response with the exact phrase '{phrase}'.",
                   "Finish with the words '{phrase}'."],
    "bullets": ["Use exactly {n} bullet points starting with '* '.",
                "Answer in exactly {n} bullet points that start with '- '."],
    "no_commas": ["Do not use any commas.", "Avoid commas entirely."],
    "start_word": ["Start your response with the word '{word}'.", "Begin with the word '{word}'."],
    "quotes": ["Wrap your whole response in double quotes.",
               "Put your entire answer inside double quotes."],
    "paragraphs": ["Write exactly {n} paragraphs separated by blank lines.",
                   "Use exactly {n} paragraphs with a blank line between them."],
}  # fmt: skip


def _quote_list(words: list[str]) -> str:
    quoted = [f"'{w}'" for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _sample_families(rng: random.Random) -> list[str]:
    k = rng.choices((1, 2, 3), weights=(3, 4, 3))[0]
    while True:
        families = rng.sample(FAMILIES, k)
        pairs = {frozenset({a, b}) for a in families for b in families if a != b}
        if not pairs & INCOMPATIBLE and not set(families) <= VACUOUS:
            return families


def _sample_params(family: str, rng: random.Random) -> dict:
    if family in ("lowercase", "no_commas", "quotes"):
        return {"type": family}
    if family == "word_count":
        form = rng.choice(("min", "max", "between"))
        if form == "min":
            return {"type": family, "min_words": rng.choice(MIN_WORDS)}
        if form == "max":
            return {"type": family, "max_words": rng.choice(MAX_WORDS)}
        lo, hi = rng.choice(BETWEEN_WORDS)
        return {"type": family, "min_words": lo, "max_words": hi}
    if family == "include_words":
        return {"type": family, "words": rng.sample(INCLUDE_WORDS, rng.choice((1, 2, 3)))}
    if family == "avoid_words":
        return {"type": family, "words": rng.sample(AVOID_WORDS, rng.choice((1, 2)))}
    if family == "end_phrase":
        return {"type": family, "phrase": rng.choice(END_PHRASES)}
    if family == "bullets":
        return {"type": family, "n": rng.choice((2, 3, 4, 5))}
    if family == "start_word":
        return {"type": family, "word": rng.choice(START_WORDS)}
    if family == "paragraphs":
        return {"type": family, "n": rng.choice((2, 3, 4))}
    raise ValueError(f"unknown family {family!r}")


def _consistent(constraints: list[dict]) -> bool:
    """No avoided word is required elsewhere, and a word cap leaves room for the layout."""
    by_type = {c["type"]: c for c in constraints}
    required = set(by_type.get("include_words", {}).get("words", []))
    required |= set(by_type.get("end_phrase", {}).get("phrase", "").split())
    required |= {by_type.get("start_word", {}).get("word", "").lower()}
    if required & set(by_type.get("avoid_words", {}).get("words", [])):
        return False
    max_words = by_type.get("word_count", {}).get("max_words")
    if max_words is not None:
        if "bullets" in by_type and max_words < 10 * by_type["bullets"]["n"]:
            return False
        if "paragraphs" in by_type and max_words < 20 * by_type["paragraphs"]["n"]:
            return False
    return True


def _phrase(constraint: dict, *, lowercase: bool, rng: random.Random) -> str:
    family = constraint["type"]
    params = {k: v for k, v in constraint.items() if k != "type"}
    if family == "word_count":
        family = {("min_words",): "min_words", ("max_words",): "max_words"}.get(
            tuple(params), "between_words"
        )
    if family in ("include_words", "avoid_words"):
        params = {
            "words": _quote_list(params["words"]),
            "s": "s" if len(params["words"]) > 1 else "",
        }
    if family == "start_word" and lowercase:
        params = {"word": params["word"].lower()}
    return rng.choice(PHRASES[family]).format(**params)


def make_rows(bases: list[str], num_rows: int, split: str, rng: random.Random) -> list[dict]:
    """`num_rows` distinct prompts cycling through `bases`, each with 1-3 compatible constraints."""
    rows, seen, order = [], set(), []
    while len(rows) < num_rows:
        if not order:
            order = rng.sample(bases, len(bases))
        base = order.pop()
        while True:
            constraints = [_sample_params(f, rng) for f in _sample_families(rng)]
            if _consistent(constraints):
                break
        lowercase = any(c["type"] == "lowercase" for c in constraints)
        phrases = [_phrase(c, lowercase=lowercase, rng=rng) for c in constraints]
        prompt = " ".join([base, *phrases])
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append(
            {"id": f"{split}-{len(rows):04d}", "prompt": prompt, "constraints": constraints,
             "base": base}
        )  # fmt: skip
    return rows


def share_table(splits: dict[str, list[dict]]) -> str:
    """Markdown table: per family, the % of prompts using it and its % of all constraints."""
    header = "| family | " + " | ".join(
        f"{name}: % prompts | {name}: % constraints" for name in splits
    )
    lines = [header + " |", "|" + " --- |" * (1 + 2 * len(splits))]
    counts = {name: Counter(c["type"] for r in rows for c in r["constraints"]) for name, rows in
              splits.items()}  # fmt: skip
    for family in FAMILIES:
        cells = []
        for name, rows in splits.items():
            total = sum(counts[name].values())
            cells += [f"{100 * counts[name][family] / len(rows):.1f}",
                      f"{100 * counts[name][family] / total:.1f}"]  # fmt: skip
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    sizes = []
    for name, rows in splits.items():
        per_row = Counter(len(r["constraints"]) for r in rows)
        sizes.append(f"{name}: {len(rows)} prompts, {len(set(r['base'] for r in rows))} bases, "
                     + ", ".join(f"{per_row[k]} with {k}" for k in (1, 2, 3)))  # fmt: skip
    return "\n".join(lines) + "\n\nConstraints per prompt: " + "; ".join(sizes) + ".\n"


README = """# IFEval-style prompts with verifiable rewards

Written by `scripts/make_ifeval_data.py --seed {seed}` (deterministic; re-running it rewrites these
files byte for byte). Everyday instructions ("describe…", "give advice on…", "explain…", "write a
short note about…") with one to three constraints in the style of IFEval. `heldout.jsonl` uses
{num_heldout_bases} base instructions that `train.jsonl` ({num_train_bases} bases) never uses.

Row: `{{"id", "prompt", "constraints": [{{"type", ...params}}], "base"}}`.

## Constraint families

| type | params | satisfied when |
| --- | --- | --- |
| lowercase | - | no uppercase character |
| word_count | min_words and/or max_words | min_words <= words <= max_words (inclusive) |
| include_words | words | each word occurs as a whole word (any case) |
| avoid_words | words | none occurs as a whole word (any case) |
| end_phrase | phrase | words, then the phrase last (any case; trailing space and . ! ? ignored) |
| bullets | n | exactly n lines start with `* ` or `- ` (after indentation) then a word |
| no_commas | - | no `,` (nor fullwidth `，`) |
| start_word | word | `word` first (any case; leading punctuation ignored), then more words |
| quotes | - | the stripped response is wrapped in `"` (or `“ ”`) around text with a word |
| paragraphs | n | exactly n blocks with a word, separated by blank lines |

Words are runs of Unicode letters/digits joined by inner apostrophes or hyphens. A response
without a word holding a letter (empty, or only marks such as `* **`) satisfies nothing; a
bullet, paragraph or quote needs such a word too (`* * *` is no bullet). Not combined in one
prompt: quotes + bullets, quotes + end_phrase, bullets + paragraphs. Every prompt has at least
one constraint that a one-word answer cannot meet (not only lowercase / no_commas /
avoid_words). An avoided word is never required by another constraint of the same prompt, and a
word cap leaves at least 10 words per bullet and 20 per paragraph.

## Share of each family

{table}
## Reward (optune_jax/rewards/ifeval.py, `ifeval_reward`)

For k constraints of which m are satisfied, and a severity s_j in (0, 1] for each missed one
(the size of the miss: relative distance to a word bound, fraction of uppercase letters or of
missing words, c / (c + 1) for c commas or avoided words, characters after the end phrase,
|count - n| / max(count, n) for bullets and paragraphs, 0.5 for a half-quoted response, …):

    reward = (m + cap * Σ_missed (1 - s_j)) / k,   cap = min(0.1, 0.9 / k)

The reward lies in [0, 1], equals 1 exactly when every constraint holds, and is 0 for a response
without a word (an empty one included). The tie-breaking term adds at most 0.1 in total and
never lifts a response above one that satisfies more constraints (cap * k < 1), but it lets
near misses outscore far misses so that wDPO's reward gap carries information.
"""


def write_ifeval_data(out_dir: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write train.jsonl, heldout.jsonl and README.md under `out_dir`; returns their paths."""
    if set(TRAIN_BASES) & set(HELDOUT_BASES):
        raise ValueError("train and held-out base instructions overlap")
    rng = random.Random(seed)
    splits = {
        "train": make_rows(TRAIN_BASES, NUM_TRAIN, "train", rng),
        "heldout": make_rows(HELDOUT_BASES, NUM_HELDOUT, "heldout", rng),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in splits.items():
        paths[name] = out_dir / f"{name}.jsonl"
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        paths[name].write_text(text, encoding="utf-8")
    paths["readme"] = out_dir / "README.md"
    paths["readme"].write_text(
        README.format(
            seed=seed, table=share_table(splits), num_train_bases=len(TRAIN_BASES),
            num_heldout_bases=len(HELDOUT_BASES),
        ),
        encoding="utf-8",
    )  # fmt: skip
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("data/ifeval"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write_ifeval_data(args.out_dir, seed=args.seed).values():
        print(path)


if __name__ == "__main__":
    main()

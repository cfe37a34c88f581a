"""Verifiers, reward and generated data of the IFEval-style task (optune_jax/rewards/ifeval.py)."""

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optune_jax.rewards import ifeval

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "ifeval"


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "make_ifeval_data", ROOT / "scripts/make_ifeval_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _rows(split):
    with open(DATA / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- words


def test_split_words():
    assert ifeval.split_words("Don't stop, well-known café! 42 — ok") == [
        "Don't", "stop", "well-known", "café", "42", "ok"
    ]  # fmt: skip
    assert ifeval.split_words("don’t") == ["don’t"]
    assert ifeval.split_words(" -- !! __ ") == []


# ---------------------------------------------------------------- one verifier per family


@pytest.mark.parametrize("family", sorted(ifeval.VERIFIERS))
@pytest.mark.parametrize("text", ["", "   \n\t ", "* **\n* **", '"..." 12 !'])
def test_a_response_without_words_misses_everything(family, text):
    params = {
        "word_count": {"max_words": 10}, "include_words": {"words": ["a"]},
        "avoid_words": {"words": ["a"]}, "end_phrase": {"phrase": "bye"}, "bullets": {"n": 1},
        "start_word": {"word": "a"}, "paragraphs": {"n": 1},
    }.get(family, {})  # fmt: skip
    assert ifeval.VERIFIERS[family](text, **params) == 1.0


@pytest.mark.parametrize(
    "text, miss",
    [("hello world.", 0.0), ("école, straße 123 !", 0.0), ("123 :)", 1.0), ("Hello", 0.2),
     ("HELLO", 1.0), ("ÉCOLE", 1.0), ("hello Ω", 1 / 6)],
)  # fmt: skip
def test_lowercase(text, miss):
    assert ifeval.miss_lowercase(text) == pytest.approx(miss)


@pytest.mark.parametrize(
    "text, bounds, miss",
    [
        ("one two three", {"min_words": 3}, 0.0),
        ("one two three", {"max_words": 3}, 0.0),
        ("one two three", {"min_words": 2, "max_words": 4}, 0.0),
        ("one two three", {"min_words": 4}, 0.25),
        ("one two three", {"max_words": 2}, 0.5),
        ("one two three four five six seven", {"max_words": 2}, 1.0),  # capped at 1
        ("don't well-known café", {"min_words": 3, "max_words": 3}, 0.0),
        ("— !! ...", {"min_words": 1}, 1.0),
    ],
)
def test_word_count(text, bounds, miss):
    assert ifeval.miss_word_count(text, **bounds) == pytest.approx(miss)


def test_word_count_near_miss_scores_higher_than_far_miss():
    near = ifeval.miss_word_count("w " * 45, min_words=50)
    far = ifeval.miss_word_count("w " * 5, min_words=50)
    assert 0 < near < far


def test_word_count_needs_a_bound():
    with pytest.raises(ValueError, match="min_words"):
        ifeval.miss_word_count("hi")


@pytest.mark.parametrize(
    "text, words, miss",
    [
        ("The Garden is green.", ["garden"], 0.0),
        ("garden, water!", ["garden", "water"], 0.0),
        ("my gardens", ["garden"], 1.0),  # whole words only
        ("a garden", ["garden", "water"], 0.5),
        ("I can’t wait", ["can't"], 0.0),  # curly apostrophe reads as straight
        ("Ünïcode words", ["ünïcode"], 0.0),
    ],
)
def test_include_words(text, words, miss):
    assert ifeval.miss_include_words(text, words=words) == pytest.approx(miss)


@pytest.mark.parametrize(
    "text, words, miss",
    [
        ("everything is fine", ["very"], 0.0),  # substrings do not count
        ("this is very nice", ["very"], 0.5),
        ("Very, VERY nice", ["very"], 2 / 3),
        ("really very", ["very", "really"], 2 / 3),
    ],
)
def test_avoid_words(text, words, miss):
    assert ifeval.miss_avoid_words(text, words=words) == pytest.approx(miss)


@pytest.mark.parametrize(
    "text",
    [
        "Some advice. hope this helps",
        "Some advice. Hope this helps.",
        "Some advice. HOPE THIS HELPS!!  \n",
        "Some advice.\nhope this helps?",
        "Yes hope this helps",
    ],
)
def test_end_phrase_passes(text):
    assert ifeval.miss_end_phrase(text, phrase="hope this helps") == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Some advice. hope this helps. Bye", "partial"),
        ('"Some advice. hope this helps."', "partial"),  # a closing quote follows the phrase
        ("Some advice. hope this helps:", "partial"),  # only . ! ? are stripped
        ("Some advice.", 1.0),
        ("nohope this helps", 1.0),  # must start at a word boundary
        ("Hope this helps.", 1.0),  # the phrase alone answers nothing
        (" ... hope this helps", 1.0),
    ],
)
def test_end_phrase_fails(text, expected):
    miss = ifeval.miss_end_phrase(text, phrase="hope this helps")
    if expected == "partial":
        assert 0 < miss < 1
    else:
        assert miss == expected


def test_end_phrase_punctuation_in_phrase_and_apostrophes():
    assert ifeval.miss_end_phrase("Done. That’s all!", phrase="that's all.") == 0.0
    assert ifeval.miss_end_phrase("Done. Anything else?", phrase="Anything else?") == 0.0
    near = ifeval.miss_end_phrase("x. good luck ok", phrase="good luck")
    far = ifeval.miss_end_phrase("x. good luck and a lot of other words", phrase="good luck")
    assert 0 < near < far < 1


@pytest.mark.parametrize(
    "text, count",
    [
        ("* one\n* two\n- three", 3),  # markers mix freely
        ("Intro line\n  * indented\n\t- tabbed", 2),
        ("• dot\n1. numbered\n**bold** line\n*nospace\n- \n---", 0),
        ("* a\r\n* b\r\n", 2),
        ("text * not at line start", 0),
        ("* * *\n* **\n- ...\n* 12", 0),  # markers with no word: the reward hack of `* **`
        ("* **Sleep** early\n* *\n* ok", 2),
    ],
)
def test_bullet_count(text, count):
    assert ifeval.bullet_count(text) == count


def test_empty_satisfaction_never_pays():
    """`* **` lines answer a bullet request with no content: they score as no bullets at all."""
    rows = [{"constraints": [{"type": "bullets", "n": 3}]}] * 2
    hack, real = "* **\n* **\n* **", "* sleep early\n* skip coffee\n* read a book"
    low, high = ifeval.ifeval_reward(rows, [hack, real])
    assert high == 1.0 and low < 0.1
    # nor does it pass the negative constraints vacuously (no commas, lowercase, avoided words)
    rows = [{"constraints": [{"type": "bullets", "n": 4}, {"type": "no_commas"}]}]
    assert ifeval.ifeval_reward(rows, ["* **\n*   **\n*   **\n*   **"])[0] == 0.0


def test_bullets_severity():
    assert ifeval.miss_bullets("* a\n* b\n* c", n=3) == 0.0
    assert ifeval.miss_bullets("* a\n* b", n=3) == pytest.approx(1 / 3)
    assert ifeval.miss_bullets("* a\n* b\n* c\n* d\n* e\n* f", n=3) == pytest.approx(0.5)
    assert ifeval.miss_bullets("no bullets here", n=3) == 1.0


@pytest.mark.parametrize(
    "text, miss", [("no commas here.", 0.0), ("one, two", 0.5), ("a，b", 0.5), ("a, b, c", 2 / 3)]
)
def test_no_commas(text, miss):
    assert ifeval.miss_no_commas(text) == pytest.approx(miss)


@pytest.mark.parametrize(
    "text, miss",
    [
        ("Honestly, I think so.", 0.0),
        ("  \n honestly i think so", 0.0),
        ('"Honestly I think so."', 0.0),  # leading punctuation (here a quote) is ignored
        ("* Honestly a bullet", 0.0),
        ("I honestly think so", 0.5),
        ("Honestly-speaking it works", 1.0),  # a hyphenated word is one word
        ("Nothing to see", 1.0),
        ("Honestly.", 1.0),  # the word alone answers nothing
        ("Honestly honestly", 0.0),
    ],
)
def test_start_word(text, miss):
    assert ifeval.miss_start_word(text, word="Honestly") == pytest.approx(miss)


@pytest.mark.parametrize(
    "text, miss",
    [
        ('"hello there"', 0.0),
        ('  \n"hello there"  \n', 0.0),
        ("“hello there”", 0.0),
        ('"he said "hi" to me"', 0.0),
        ('"hello there', 0.5),
        ('hello there"', 0.5),
        ('"', 1.0),  # no word inside
        ('""', 1.0),
        ('"  "', 1.0),
        ('"..."', 1.0),  # a quoted span needs a word
        ("hello there", 1.0),
    ],
)
def test_quotes(text, miss):
    assert ifeval.miss_quotes(text) == miss


@pytest.mark.parametrize(
    "text, count",
    [
        ("one block\nsame block", 1),
        ("first\n\nsecond", 2),
        ("first\n   \t\nsecond\n\n\n\nthird", 3),
        ("\n\nfirst\n\nsecond\n\n", 2),
        ("first\r\n\r\nsecond", 2),
        ("first\n\n* * *\n\n---\n\nsecond", 2),  # separators are no paragraphs
    ],
)
def test_paragraph_count(text, count):
    assert ifeval.paragraph_count(text) == count


def test_paragraphs_severity():
    assert ifeval.miss_paragraphs("a\n\nb", n=2) == 0.0
    assert ifeval.miss_paragraphs("a\n\nb\n\nc\n\nd", n=2) == 0.5


# ---------------------------------------------------------------- dispatch and reward


def test_constraint_miss_errors_are_one_line():
    with pytest.raises(ValueError, match=r"'shout'.*avoid_words.*word_count") as info:
        ifeval.constraint_miss({"type": "shout"}, "hi")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="bad parameters"):
        ifeval.constraint_miss({"type": "bullets", "count": 3}, "hi")


def test_prompt_reward_examples():
    constraints = [{"type": "lowercase"}, {"type": "no_commas"}, {"type": "word_count",
                                                                   "min_words": 4}]  # fmt: skip
    assert ifeval.prompt_reward(constraints, "all good in here") == 1.0
    assert ifeval.prompt_reward(constraints, "") == 0.0
    # Two satisfied, one missed by 1 of 4 words: (2 + 0.1 * 0.75) / 3.
    assert ifeval.prompt_reward(constraints, "all good here") == pytest.approx((2 + 0.075) / 3)


def test_near_miss_beats_far_miss_but_not_an_extra_constraint():
    constraints = [{"type": "word_count", "min_words": 10}, {"type": "no_commas"}]
    near = ifeval.prompt_reward(constraints, "w " * 9)
    far = ifeval.prompt_reward(constraints, "w " * 1)
    both = ifeval.prompt_reward(constraints, "w " * 10)
    worst = ifeval.prompt_reward(constraints, "w, " * 1)
    assert worst < far < near < both == 1.0
    assert near - far <= 0.1


_PIECES = ["the", "The", "very", "honestly", "Honestly", "garden", ",", " ", " ", "\n", "\n\n",
           "* ", "- ", '"', ".", "!", "hope this helps", "É", "x"]  # fmt: skip
texts = st.lists(st.sampled_from(_PIECES), max_size=30).map("".join)


@given(a=texts, b=texts, which=st.integers(0, 10**6))
@settings(max_examples=300, deadline=None)
def test_reward_range_and_order(a, b, which):
    rows = _rows("train")
    constraints = rows[which % len(rows)]["constraints"]
    reward_a, reward_b = (ifeval.prompt_reward(constraints, t) for t in (a, b))
    sat_a, sat_b = (sum(ifeval.constraint_miss(c, t) == 0 for c in constraints) for t in (a, b))
    assert 0.0 <= reward_a <= 1.0
    assert (reward_a == 1.0) == (sat_a == len(constraints))
    assert sat_a / len(constraints) <= reward_a <= sat_a / len(constraints) + 0.1
    if sat_a > sat_b:
        assert reward_a > reward_b


def test_ifeval_reward_array_and_errors():
    rows = [{"constraints": [{"type": "lowercase"}]}, {"constraints": [{"type": "no_commas"}]}]
    scores = ifeval.ifeval_reward(rows, ["fine", "a, b"])
    assert scores.dtype == np.float32 and scores.shape == (2,)
    assert scores[0] == 1.0 and 0 < scores[1] < 0.1
    with pytest.raises(ValueError, match="2 rows but 1 responses"):
        ifeval.ifeval_reward(rows, ["x"])
    with pytest.raises(ValueError, match="row 0 has no 'constraints'"):
        ifeval.ifeval_reward([{"prompt": "x"}], ["x"])


# ---------------------------------------------------------------- generated data


def _oracle_response(constraints):
    """A response built to satisfy every constraint: proves each prompt is satisfiable."""
    by_type = {c["type"]: c for c in constraints}
    filler = ["the", "sun", "rose", "over", "green", "hills", "and", "birds", "sang", "softly"]
    head = [by_type["start_word"]["word"]] if "start_word" in by_type else []
    body = list(by_type.get("include_words", {}).get("words", []))
    tail = by_type["end_phrase"]["phrase"].split() if "end_phrase" in by_type else []
    blocks = by_type.get("bullets", by_type.get("paragraphs", {"n": 1}))["n"]
    low = by_type.get("word_count", {}).get("min_words", 0)
    total = max(low, len(head) + len(body) + len(tail) + 2 * blocks)
    body += [filler[i % len(filler)] for i in range(total - len(head) - len(body) - len(tail))]
    words = head + body
    cuts = np.linspace(0, len(words), blocks + 1).astype(int)
    chunks = [" ".join(words[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    chunks[-1] = " ".join([chunks[-1], *tail])  # the end phrase stays whole, at the very end
    if "bullets" in by_type:
        text = "\n".join("* " + chunk for chunk in chunks)
    else:
        text = "\n\n".join(chunks)
    text = text.lower() if "lowercase" in by_type else text
    return f'"{text}"' if "quotes" in by_type else text


@pytest.mark.parametrize("split, minimum", [("train", 600), ("heldout", 150)])
def test_generated_rows_meet_the_spec(split, minimum):
    gen = _load_generator()
    rows = _rows(split)
    assert len(rows) >= minimum
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["prompt"] for r in rows}) == len(rows)
    for row in rows:
        assert set(row) == {"id", "prompt", "constraints", "base"}
        assert row["prompt"].startswith(row["base"])
        assert len(row["prompt"].split()) < 60
        types = [c["type"] for c in row["constraints"]]
        assert 1 <= len(types) <= 3 and len(set(types)) == len(types)
        assert not set(types) <= gen.VACUOUS
        assert not any(pair <= set(types) for pair in gen.INCOMPATIBLE)
        assert ifeval.prompt_reward(row["constraints"], _oracle_response(row["constraints"])) == 1.0


def test_heldout_bases_are_disjoint_and_plenty():
    train_bases = {r["base"] for r in _rows("train")}
    heldout_bases = {r["base"] for r in _rows("heldout")}
    assert len(train_bases) >= 80 and len(heldout_bases) >= 25
    assert not train_bases & heldout_bases


def test_every_family_appears_in_both_splits():
    for split in ("train", "heldout"):
        families = {c["type"] for r in _rows(split) for c in r["constraints"]}
        assert families == set(ifeval.VERIFIERS)


def test_generator_is_deterministic_and_matches_committed_files(tmp_path):
    gen = _load_generator()
    first = gen.write_ifeval_data(tmp_path / "a", seed=0)
    second = gen.write_ifeval_data(tmp_path / "b", seed=0)
    for key, path in first.items():
        assert path.read_bytes() == second[key].read_bytes()
        assert path.read_bytes() == (DATA / path.name).read_bytes(), f"regenerate {path.name}"
    other = gen.write_ifeval_data(tmp_path / "c", seed=1)
    assert other["train"].read_bytes() != first["train"].read_bytes()


def test_module_docstring_shares_match_the_data():
    doc = " ".join(ifeval.__doc__.split())
    counts = {}
    for split in ("train", "heldout"):
        types = [c["type"] for r in _rows(split) for c in r["constraints"]]
        counts[split] = {f: 100 * types.count(f) / len(types) for f in ifeval.VERIFIERS}
    for family in ifeval.VERIFIERS:
        share = f"{family} {counts['train'][family]:.1f} / {counts['heldout'][family]:.1f}"
        assert share in doc

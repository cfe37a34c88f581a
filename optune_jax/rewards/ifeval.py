"""Verifiable instruction-following reward in the style of IFEval (data: data/ifeval/).

Every prompt row carries one to three constraints, `{"type": <family>, ...params}`. Each family
has a verifier `miss_<family>(text, **params) -> float` in [0, 1]: 0.0 exactly when the response
satisfies the constraint, otherwise a severity that grows with the size of the miss (used only
to break ties, see below). Words are maximal runs of Unicode letters/digits, joined by inner
apostrophes or hyphens ("don't", "well-known" are one word); word matching ignores case.

A response without a word (a run of letters/digits holding a letter), such as an empty one or
lines of `* **`, satisfies nothing (severity 1 for every family): without this rule it would
pass "lowercase", "no commas" and "avoid words" vacuously. For the same reason a bullet, a
paragraph and a quoted span count only when they hold a word: lines of `* * *` or `* **` are no
bullets, and `"..."` is no quoted answer.

Families (params; satisfied when; severity s of a miss):
- lowercase (-): no character is uppercase (str.isupper); s = uppercase / letters.
- word_count (min_words and/or max_words): min_words <= #words <= max_words, inclusive;
  s = (min_words - n) / min_words below, min(1, (n - max_words) / max_words) above.
- include_words (words): every word occurs as a whole word; s = missing / required.
- avoid_words (words): none occurs as a whole word; s = c / (c + 1) for c occurrences.
- end_phrase (phrase): the response ends with the phrase (rule below) after a word of its own;
  s = t / (t + len(phrase)) for t characters after its last occurrence, 1 if it is absent or
  nothing with a word comes before it ("Hope this helps." alone answers nothing).
- bullets (n): exactly n lines start, after spaces or tabs, with "*" or "-" then a space and
  text holding a word ("* a" and "- b" mix freely; "•", "1.", "**bold**" and "* **" are not
  bullets);
  s = |count - n| / max(count, n).
- no_commas (-): no "," (nor fullwidth "，"); s = c / (c + 1).
- start_word (word): the first word is `word` and another word follows; leading punctuation is
  ignored, so '"Sure, …' starts with "Sure"; s = p / (p + 1) for its first word position p, 1
  if absent or if it is the only word.
- quotes (-): the stripped response starts with " or “ and ends with " or ”, with a word
  inside (inner quotes allowed); s = 0.5 if only one side is quoted, else 1.
- paragraphs (n): exactly n blocks holding a word, separated by blank (whitespace-only) lines;
  s = |count - n| / max(count, n).

End-phrase rule: trailing whitespace and a trailing run of sentence punctuation (. ! ?) are removed
from the response and from the phrase, then the response must end with the phrase (ignoring case,
’ read as ') at a word boundary: "…hope this helps." and "…Hope this helps!  " pass, "…hope this
helps. Bye" and "…hope this helps\"" (closing quote) fail.

Reward of a response to a prompt with k constraints, m of them satisfied, severities s_j of the
k - m missed ones, cap = min(0.1, 0.9 / k):

    reward = (m + cap * Σ_missed (1 - s_j)) / k        in [0, 1]

The tie-breaking term gives near misses partial credit below `cap` per missed constraint, at most
0.1 in total; since cap * k < 1 it never lifts a response above one that satisfies more
constraints. A reward of 1 means every constraint holds; a response without a word scores 0.

Data (scripts/make_ifeval_data.py, seed 0): 640 train prompts over 106 base instructions and 160
held-out prompts over 36 other ones, 1-3 constraints each (1301 and 321 constraints). Share of
all constraints, train / held-out, %: lowercase 8.8 / 9.7, word_count 11.1 / 11.8,
include_words 12.1 / 11.5, avoid_words 8.3 / 10.3, end_phrase 10.3 / 10.0, bullets 9.4 / 9.3,
no_commas 9.6 / 8.4, start_word 11.5 / 11.8, quotes 8.8 / 5.6, paragraphs 10.3 / 11.5
(per-prompt shares in data/ifeval/README.md).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

import numpy as np

_WORD_RE = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")
_BULLET_RE = re.compile(r"^[ \t]*[*-][ \t]+(\S.*)$", re.MULTILINE)
_PARAGRAPH_SPLIT_RE = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")
_END_PUNCT = ".!?"
_COMMAS = (",", "，")


def split_words(text: str) -> list[str]:
    """The words of `text` (runs of letters/digits joined by inner ' ’ or -), in order."""
    return _WORD_RE.findall(text)


def has_words(text: str) -> bool:
    """True when `text` holds a word with a letter (a bullet, paragraph or quote needs one)."""
    return any(any(c.isalpha() for c in w) for w in split_words(text))


def _folded_words(text: str) -> list[str]:
    return [w.casefold().replace("’", "'") for w in split_words(text)]


def _blank_misses(fn: Callable[..., float]) -> Callable[..., float]:
    """A response without a word (empty, blank, only marks) misses every constraint fully."""

    @functools.wraps(fn)
    def wrapped(text: str, **params) -> float:
        return fn(text, **params) if has_words(text) else 1.0

    return wrapped


@_blank_misses
def miss_lowercase(text: str) -> float:
    """0 if no character is uppercase, else the fraction of letters that are uppercase."""
    upper = sum(c.isupper() for c in text)
    return upper / max(sum(c.isalpha() for c in text), upper, 1)


@_blank_misses
def miss_word_count(text: str, min_words: int | None = None, max_words: int | None = None) -> float:
    """0 if min_words <= #words <= max_words (either optional), else the relative distance."""
    if min_words is None and max_words is None:
        raise ValueError("word_count needs 'min_words' or 'max_words'")
    n = len(split_words(text))
    if min_words is not None and n < min_words:
        return (min_words - n) / min_words
    if max_words is not None and n > max_words:
        return min(1.0, (n - max_words) / max(max_words, 1))
    return 0.0


@_blank_misses
def miss_include_words(text: str, words: Sequence[str]) -> float:
    """0 if every word occurs as a whole word (any case), else the fraction missing."""
    present = set(_folded_words(text))
    missing = [w for w in words if w.casefold().replace("’", "'") not in present]
    return len(missing) / len(words)


@_blank_misses
def miss_avoid_words(text: str, words: Sequence[str]) -> float:
    """0 if none of the words occurs as a whole word (any case), else c / (c + 1)."""
    banned = {w.casefold().replace("’", "'") for w in words}
    count = sum(w in banned for w in _folded_words(text))
    return count / (count + 1)


def _strip_end(text: str) -> str:
    return text.rstrip().rstrip(_END_PUNCT).rstrip().casefold().replace("’", "'")


@_blank_misses
def miss_end_phrase(text: str, phrase: str) -> float:
    """0 if the response ends with the phrase (see module docstring for the exact rule).

    Else t / (t + len(phrase)) with t the characters after its last occurrence; 1 if absent.
    """
    body, target = _strip_end(text), _strip_end(phrase)
    if not target:
        raise ValueError("end_phrase needs a non-blank 'phrase'")
    pattern = re.compile(r"(?<![^\W_])" + re.escape(target) + r"(?![^\W_])")
    matches = list(pattern.finditer(body))
    if not matches or not has_words(body[: matches[-1].start()]):  # the phrase alone: no answer
        return 1.0
    trailing = len(body) - matches[-1].end()
    return trailing / (trailing + len(target))


def bullet_count(text: str) -> int:
    """Lines that start (after spaces or tabs) with "*" or "-", a space, then text with a word."""
    return sum(has_words(rest) for rest in _BULLET_RE.findall(text.replace("\r\n", "\n")))


@_blank_misses
def miss_bullets(text: str, n: int) -> float:
    """0 if there are exactly n bullet lines, else |count - n| / max(count, n)."""
    count = bullet_count(text)
    return abs(count - n) / max(count, n, 1)


@_blank_misses
def miss_no_commas(text: str) -> float:
    """0 if there is no comma (ASCII or fullwidth), else c / (c + 1)."""
    count = sum(text.count(c) for c in _COMMAS)
    return count / (count + 1)


@_blank_misses
def miss_start_word(text: str, word: str) -> float:
    """0 if the first word is `word` (any case); else p / (p + 1), p its position; 1 if absent."""
    folded = _folded_words(text)
    target = word.casefold().replace("’", "'")
    if target not in folded:
        return 1.0
    position = folded.index(target)
    if len(folded) == 1:  # the word alone: no answer
        return 1.0
    return position / (position + 1)


@_blank_misses
def miss_quotes(text: str) -> float:
    """0 if the stripped response is wrapped in double quotes around text holding a word.

    Straight (") or curly (“ ”) quotes; 0.5 if only one side is quoted, else 1.
    """
    stripped = text.strip()
    opens = stripped[:1] in ('"', "“")
    closes = len(stripped) >= 2 and stripped[-1] in ('"', "”")
    if opens and closes and has_words(stripped[1:-1]):
        return 0.0
    return 0.5 if opens != closes else 1.0


def paragraph_count(text: str) -> int:
    """Blocks holding a word, separated by one or more blank (whitespace-only) lines."""
    blocks = _PARAGRAPH_SPLIT_RE.split(text.replace("\r\n", "\n"))
    return sum(has_words(block) for block in blocks)


@_blank_misses
def miss_paragraphs(text: str, n: int) -> float:
    """0 if there are exactly n paragraphs, else |count - n| / max(count, n)."""
    count = paragraph_count(text)
    return abs(count - n) / max(count, n, 1)


VERIFIERS: dict[str, Callable[..., float]] = {
    "lowercase": miss_lowercase,
    "word_count": miss_word_count,
    "include_words": miss_include_words,
    "avoid_words": miss_avoid_words,
    "end_phrase": miss_end_phrase,
    "bullets": miss_bullets,
    "no_commas": miss_no_commas,
    "start_word": miss_start_word,
    "quotes": miss_quotes,
    "paragraphs": miss_paragraphs,
}


def constraint_miss(constraint: dict, text: str) -> float:
    """Severity in [0, 1] of `text` missing `constraint` ({"type": family, ...params}); 0 = met."""
    params = dict(constraint)
    family = params.pop("type", None)
    if family not in VERIFIERS:
        raise ValueError(f"unknown constraint type {family!r}; expected one of {sorted(VERIFIERS)}")
    try:
        return VERIFIERS[family](text, **params)
    except TypeError as error:
        raise ValueError(f"bad parameters for constraint {constraint!r}: {error}") from None


def prompt_reward(constraints: Sequence[dict], text: str) -> float:
    """(m + cap * Σ_missed (1 - s_j)) / k with cap = min(0.1, 0.9 / k); see module docstring."""
    k = len(constraints)
    if k == 0:
        raise ValueError("prompt_reward: a prompt needs at least one constraint")
    cap = min(0.1, 0.9 / k)
    misses = [constraint_miss(c, text) for c in constraints]
    satisfied = sum(s == 0.0 for s in misses)
    partial = sum(1.0 - s for s in misses if s > 0.0)
    return (satisfied + cap * partial) / k


def ifeval_reward(rows: Sequence[dict], responses: Sequence[str]) -> np.ndarray:
    """float32 reward per response; rows[i]["constraints"] are the constraints of responses[i]."""
    if len(rows) != len(responses):
        raise ValueError(
            f"ifeval_reward: {len(rows)} rows but {len(responses)} responses; expected one row each"
        )
    scores = np.empty(len(responses), np.float32)
    for i, (row, text) in enumerate(zip(rows, responses, strict=True)):
        if "constraints" not in row:
            raise ValueError(f"ifeval_reward: row {i} has no 'constraints'")
        scores[i] = prompt_reward(row["constraints"], text)
    return scores

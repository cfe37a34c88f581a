"""Checks of answer text for the ways a text reward is gamed (host Python, no model).

    on_topic_rate(texts, topics)   # fraction of answers that name their prompt's subject
    exclamations(texts)            # mean '!' per answer (VADER-style scorers reward them)

A sentiment reward does not read the topic: a policy can raise it by leaving the subject for
generic cheer ("What a wonderful day!"), which stays fluent (low NLL under π_0) and unrepeated
(low seq-rep-4), so neither drift metric sees it. A row's `topic` lists lowercase stems of its
subject's content words; an answer is on topic when one of its words starts with a stem (a
stem with a space must occur as written).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")


def mentions(text: str, stems: Sequence[str]) -> bool:
    """True when a word of `text` starts with one of `stems` (case-insensitive)."""
    low = text.lower()
    words = _WORD.findall(low)
    for stem in stems:
        stem = stem.lower()
        if " " in stem:
            if stem in low:
                return True
        elif any(w.startswith(stem) for w in words):
            return True
    return False


def on_topic_rate(texts: Sequence[str], topics: Sequence[Sequence[str]]) -> float:
    """Fraction of `texts[i]` that mention a stem of `topics[i]`."""
    if len(texts) != len(topics):
        raise ValueError(f"on_topic_rate: {len(texts)} texts but {len(topics)} topics")
    if not texts:
        return float("nan")
    return float(np.mean([mentions(t, s) for t, s in zip(texts, topics, strict=True)]))


def exclamations(texts: Sequence[str]) -> float:
    """Mean number of '!' per text."""
    return float(np.mean([t.count("!") for t in texts])) if texts else float("nan")

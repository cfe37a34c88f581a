"""Checks of answer text for reward games: on-topic rate and exclamation marks."""

import pytest

from optune_jax import text_checks


@pytest.mark.parametrize(
    "text, stems, want",
    [
        ("Traffic was slow today.", ["traffic", "jam"], True),
        ("The commuting crowd grumbles.", ["commut"], True),  # a stem matches a longer word
        ("What a wonderful day!", ["traffic", "jam", "car"], False),  # generic cheer: off topic
        ("Scarcely anyone came.", ["car"], False),  # a stem matches at a word's start only
        ("The post office queue.", ["post office"], True),  # a stem with a space: as written
        ("Post the office memo.", ["post office"], False),
        ("", ["rain"], False),
        ("RAIN AGAIN", ["rain"], True),  # case-insensitive
    ],
)
def test_mentions(text, stems, want):
    assert text_checks.mentions(text, stems) is want


def test_on_topic_rate_and_exclamations():
    texts = ["A traffic jam.", "Joy! Joy!", "Rain on Monday."]
    topics = [["traffic"], ["traffic"], ["rain", "monday"]]
    assert text_checks.on_topic_rate(texts, topics) == pytest.approx(2 / 3)
    assert text_checks.exclamations(texts) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="3 texts but 2 topics"):
        text_checks.on_topic_rate(texts, topics[:2])

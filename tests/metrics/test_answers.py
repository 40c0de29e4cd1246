"""The answer metrics (exact match, token F1) on hand-made cases."""

import pytest

from grounding.metrics.answers import exact_match, normalize_answer, token_f1


def test_normalization_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("  The  Red, circle!  ") == "red circle"
    assert normalize_answer("An apple and a pear.") == "apple and pear"
    assert normalize_answer("theatre") == "theatre"  # an article inside a word stays


def test_exact_match_and_token_f1():
    assert exact_match("A goldfish.", "a goldfish") == 1.0
    assert exact_match("goldfish bowl", "a goldfish") == 0.0
    # "red red circle" vs "red square": one common "red" (counted once), precision 1/3, recall 1/2
    assert token_f1("a red red circle", "the red square") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert token_f1("red circle", "The circle, red") == 1.0
    assert token_f1("", "") == 1.0 and token_f1("", "red") == 0.0 and token_f1("blue", "red") == 0.0

"""Scores of a free-text answer against a target text (MIMIC's semantic metrics, docs/mimic.md "Metrics").

The texts are compared after SQuAD-style normalization (``normalize_answer``): lower case, no punctuation, no
articles (a / an / the), single spaces. ``exact_match`` is 1 when the normalized texts are equal; ``token_f1`` is
the F1 of their words as bags (counted with multiplicity).
"""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a / an / the), single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, target: str) -> float:
    """1.0 when the normalized answer equals the normalized target, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(target))


def token_f1(prediction: str, target: str) -> float:
    """F1 of the normalized words (a bag of words, counted with multiplicity); two empty texts: 1.0."""
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(target).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    remaining = list(wanted)
    common = 0
    for word in predicted:
        if word in remaining:
            remaining.remove(word)
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)

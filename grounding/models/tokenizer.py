"""Tokenizers for Grounding DINO's BERT text encoder.

A pretrained checkpoint ships its own tokenizer (``bert-base-uncased``'s WordPiece vocabulary). Offline,
tiny random models still need one, and transformers' Grounding DINO relies on a few BERT ids being where
BERT puts them: its label maps split the prompt at [CLS] 101, [SEP] 102, "." 1012 and "?" 1029, and
treat [PAD] 0 as padding (``SPECIAL_TOKENS`` in ``modeling_grounding_dino``). ``build_wordpiece_tokenizer``
builds (in memory) a small WordPiece vocabulary that keeps exactly those ids and covers any lower-case word through
single-character pieces.
"""

from __future__ import annotations

import string
from pathlib import Path

from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

#: ids transformers' Grounding DINO hard-codes (``SPECIAL_TOKENS`` plus padding).
BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}

#: whole words given their own id so that common category words are one token each.
DEFAULT_WORDS = (
    # colours and shapes of the synthetic dataset
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey", "gray", "pink", "brown",
    "circle", "square", "triangle", "star", "diamond", "rectangle", "ellipse", "cross", "hexagon", "ring",
    # words of referring expressions
    "the", "a", "an", "of", "on", "at", "in", "to", "and", "with", "from", "image", "left", "right", "top", "bottom",
    "middle", "center", "centre", "upper", "lower", "small", "large", "big", "little", "smallest",
    "largest", "biggest", "one", "two", "three", "other", "object", "shape", "photo", "side", "corner",
    "first", "second", "third", "leftmost", "rightmost", "topmost",
)


def wordpiece_vocabulary(words: tuple[str, ...] = DEFAULT_WORDS) -> list[str]:
    """The vocabulary list (index = token id) with BERT's special ids in place.

    Slots not used by a special token, a word or a character piece hold ``[unusedK]`` placeholders.
    """
    pieces = [",", "!", "'", "-", "(", ")", ":", ";", "/", "&", "+"]
    pieces += list(string.ascii_lowercase) + list(string.digits)
    pieces += ["##" + c for c in string.ascii_lowercase + string.digits]
    extra = [w for w in dict.fromkeys(list(words) + pieces) if w not in BERT_SPECIAL_IDS]
    size = max(BERT_SPECIAL_IDS.values()) + 1 + len(extra)
    vocab: list[str | None] = [None] * size
    for token, index in BERT_SPECIAL_IDS.items():
        vocab[index] = token
    free = (i for i in range(size) if vocab[i] is None and i > 103)
    for token in extra:
        vocab[next(free)] = token
    return [token if token is not None else f"[unused{i}]" for i, token in enumerate(vocab)]


def build_wordpiece_tokenizer(folder: str | Path | None = None, words: tuple[str, ...] = DEFAULT_WORDS) -> BertTokenizerFast:
    """A lower-casing BERT WordPiece tokenizer over ``wordpiece_vocabulary(words)``, built in memory.

    folder: also save it there (``vocab.txt`` and transformers' tokenizer files), so that
    ``AutoTokenizer.from_pretrained(folder)`` gives the same tokenizer; None writes nothing.
    """
    vocabulary = wordpiece_vocabulary(words)
    tokenizer = BertTokenizerFast(vocab={token: index for index, token in enumerate(vocabulary)}, do_lower_case=True)
    for token, index in BERT_SPECIAL_IDS.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != index:  # a transformers change would silently break Grounding DINO's label maps
            raise RuntimeError(f"the offline WordPiece tokenizer maps {token!r} to {got}, Grounding DINO needs {index}")
    if folder is not None:
        tokenizer.save_pretrained(str(folder))
    return tokenizer


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a pretrained checkpoint (hub id or local folder)."""
    return AutoTokenizer.from_pretrained(name_or_path)

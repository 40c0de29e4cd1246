"""An offline byte-level BPE tokenizer for tiny random CLIP text encoders.

A pretrained CLIP checkpoint ships its own tokenizer (OpenAI's 49,408-token byte-level BPE). Offline there is
no such vocabulary, yet the tiny randomly initialised ``CLIPModel`` of the tests and the synthetic-data demo
still needs one. ``build_clip_tokenizer`` builds a small vocabulary in exactly the format of OpenAI CLIP's
(``vocab.json`` + ``merges.txt``) in memory with transformers' own ``CLIPTokenizer``, so the text goes
through the same normalisation (NFC, whitespace collapsing, lower-casing), the same pre-tokenisation regex and
the same post-processing (``<|startoftext|> ... <|endoftext|>``) as with a real checkpoint.

Layout of the vocabulary, as in OpenAI's file:

* ids 0..255: the 256 byte-to-unicode symbols of byte-level BPE (GPT-2's ``bytes_to_unicode`` order);
* ids 256..511: the same symbols with the end-of-word suffix ``</w>``;
* then every token produced by a merge (sorted by length, then alphabetically);
* last two ids: ``<|startoftext|>`` (bos) and ``<|endoftext|>`` (eos, also pad and unk, as in OpenAI CLIP).

The base symbols make every string tokenizable: a word the merges do not build falls back to smaller pieces,
down to single bytes, never to an unknown token. Every pre-token of ``words`` is built into a single token
``"<word></w>"``. To make that hold whatever the merge ranks, the merges contain every split of every
substring of every word (``w[i:j] + w[j:k] -> w[i:k]``): whichever merges fire first, any two neighbouring
pieces of a word are again substrings of it and have a merge, so merging only stops at the whole word.

eos is the largest id, so transformers' ``CLIPTextTransformer`` pools the right position under both of its
rules: the first position holding ``eos_token_id`` (any ``eos_token_id != 2``) and the legacy
``argmax(input_ids)`` (``eos_token_id == 2``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77
"""Context length of CLIP's text encoder (``max_position_embeddings`` of its config)."""

#: prompt templates whose words should be single tokens.
PROMPT_TEMPLATES = ("a photo of a", "a photo of the", "an image of a", "a picture of a", "this is a", ".")

#: common English words of prompts and region descriptions.
COMMON_WORDS = (
    "a", "an", "the", "of", "on", "in", "at", "to", "and", "or", "with", "from", "is", "are", "this", "that",
    "there", "it", "its", "some", "one", "two", "three", "photo", "image", "picture", "background", "foreground",
    "object", "objects", "shape", "shapes", "thing", "region", "area", "part", "something", "other", "center",
    "centre", "upper", "lower", "corner", "side", "white", "black", "grey", "gray", "orange", "pink", "brown",
    "ring", "rectangle", "ellipse", "cross", "hexagon", "colour", "color", "little", ",",
)


#: the words of the project's synthetic dataset: every colour and shape name it knows, then the other words of
#: its referring expressions, as ``grounding.data.synthetic.vocabulary_words()`` gives them. Written out here
#: because models do not import the data layer, and fixed because the token ids of every tiny model, and so
#: its random weights, follow from the vocabulary; tests/models/test_clip_tokenizer.py keeps the two equal.
SYNTHETIC_WORDS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "purple",
    "circle", "square", "triangle", "star", "diamond",
    "the", "on", "at", "in", "of", "from", "image", "left", "right", "top", "bottom", "middle",
    "small", "large", "big", "smallest", "largest", "biggest", "second", "third",
)


def _split_words(texts: Iterable[str]) -> tuple[str, ...]:
    """Whitespace-separated words of ``texts``, in first-seen order, without duplicates."""
    return tuple(dict.fromkeys(word for text in texts for word in text.split()))


#: words built into single tokens by default: the synthetic dataset's vocabulary, prompt template words and
#: common prompt words (templates are split into their words). A caller with other text passes its own
#: ``words`` to ``build_clip_tokenizer``.
DEFAULT_WORDS: tuple[str, ...] = _split_words(SYNTHETIC_WORDS + PROMPT_TEMPLATES + COMMON_WORDS)


def bytes_to_unicode() -> dict[int, str]:
    """Byte → printable unicode symbol map of byte-level BPE (GPT-2 / CLIP), in vocabulary order.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, ...) to ``chr(256 + n)``.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = dict(zip(printable, printable))
    extra = 0
    for byte in range(256):
        if byte not in codes:
            codes[byte] = 256 + extra
            extra += 1
    order = printable + [byte for byte in range(256) if byte not in printable]
    return {byte: chr(codes[byte]) for byte in order}


def _pre_tokens(words: Iterable[str]) -> list[str]:
    """Byte-level pre-tokens of ``words`` exactly as ``CLIPTokenizer`` will see them.

    Uses the normalizer and pre-tokenizer of transformers' own ``CLIPTokenizer`` (lower-casing, CLIP's split
    regex, byte-to-unicode mapping), so "Photo" gives "photo", "don't" gives "don" and "'t", "café" gives
    "cafÃ©".
    """
    backend = CLIPTokenizer().backend_tokenizer
    pieces: dict[str, None] = {}
    for word in words:
        if not isinstance(word, str):
            raise TypeError(f"words must be strings, got {word!r}")
        text = backend.normalizer.normalize_str(word)
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text):
            pieces[piece] = None
    return list(pieces)


def bpe_vocabulary(words: Iterable[str] = DEFAULT_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP-format vocabulary (token → id) and merge list (in rank order) that build each word whole.

    See the module docstring for the layout and why every substring split is a merge.
    """
    symbols = list(bytes_to_unicode().values())
    merges: dict[tuple[str, str], str] = {}
    for piece in _pre_tokens(words):
        # symbols of the word as BPE sees them: characters, the last one carrying the end-of-word suffix
        chars = list(piece)
        chars[-1] += END_OF_WORD
        n = len(chars)
        for start in range(n):
            for end in range(start + 2, n + 1):
                for cut in range(start + 1, end):
                    left, right = "".join(chars[start:cut]), "".join(chars[cut:end])
                    merges[(left, right)] = left + right
    base = symbols + [symbol + END_OF_WORD for symbol in symbols]
    base_set = set(base)
    merged = sorted({token for token in merges.values() if token not in base_set}, key=lambda t: (len(t), t))
    ranked = sorted(merges, key=lambda pair: (len(merges[pair]), merges[pair], len(pair[0]), pair))
    tokens = base + merged + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, ranked


def build_clip_tokenizer(out_dir: str | Path | None = None, words: Iterable[str] = DEFAULT_WORDS) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer for ``words``, built in memory with transformers' own ``CLIPTokenizer``.

    out_dir: also save it there: OpenAI-format ``vocab.json`` and ``merges.txt`` plus transformers'
    ``tokenizer_config.json`` / ``tokenizer.json``, so ``AutoTokenizer.from_pretrained(out_dir)`` gives the
    same tokenizer; None writes nothing. Each pre-token of ``words`` (lower-cased, split as CLIP splits text)
    is one token ``"<word></w>"``; any other text still tokenizes, into smaller pieces down to single bytes.
    bos = ``<|startoftext|>``, eos = pad = unk = ``<|endoftext|>`` (OpenAI's choice), ``model_max_length`` 77.

    transformers 5 has a single ``CLIPTokenizer`` class (backed by the ``tokenizers`` library; there is no
    separate ``CLIPTokenizerFast``); it is what ``AutoTokenizer`` returns for a saved folder.
    """
    vocab, merges = bpe_vocabulary(words)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=[(left, right) for left, right in merges],
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )
    ids = clip_token_ids(tokenizer)
    expected = {"bos_token_id": vocab[BOS_TOKEN], "eos_token_id": vocab[EOS_TOKEN], "vocab_size": len(vocab)}
    if any(ids[key] != value for key, value in expected.items()):
        # a transformers change would silently give the text encoder ids it was not configured for
        raise RuntimeError(f"the offline CLIP tokenizer does not use the ids of its vocabulary: {ids}")
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merge_lines = "".join(f"{left} {right}\n" for left, right in merges)
        (out_dir / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def clip_token_ids(tokenizer) -> dict[str, int]:
    """``bos_token_id``, ``eos_token_id``, ``pad_token_id`` and ``vocab_size`` of ``tokenizer``.

    The keys are ``CLIPTextConfig`` arguments, so a matching tiny text encoder is
    ``CLIPTextConfig(**clip_token_ids(tokenizer), hidden_size=32, ...)``. Raises ``ValueError`` when the eos
    id is the legacy value 2 but not the largest id: ``CLIPTextTransformer`` would then pool at
    ``argmax(input_ids)`` instead of at the eos token.
    """
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": len(tokenizer),
    }
    missing = [key for key, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"tokenizer has no {', '.join(missing)}; a CLIP text encoder needs all of them")
    if ids["eos_token_id"] == 2 and ids["vocab_size"] - 1 != 2:
        raise ValueError("eos_token_id 2 makes CLIPTextTransformer pool at argmax(input_ids), not at the eos token")
    return ids

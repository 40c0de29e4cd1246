"""Text prompts for Grounding DINO built from category names (docs/image.md "Prompt").

Category names are lower-cased and joined as ``"cat . dog . person ."``; each category owns the tokens of
its phrase. transformers' Grounding DINO finds phrases by splitting the token sequence at its delimiter
ids ([CLS], [SEP], ".", "?") and labels them 0, 1, 2, ... in order; ``class_labels`` of the loss are those
positions. ``build_prompts`` derives the token span of every category from the tokenizer's character
offsets and checks that it coincides with the phrase the model will see at the same position: a name that
contains a delimiter, tokenizes to nothing or overflows the prompt fails here, loudly, instead of training
against the wrong label map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: ids that end a phrase in transformers' Grounding DINO (its ``SPECIAL_TOKENS``); [PAD] = 0 too.
DELIMITER_IDS = (101, 102, 1012, 1029)


@dataclass
class Prompt:
    """One prompt: text, its tokens, and which dataset category sits at which phrase position.

    ``positive_map`` is (C, L): row i is 1 on the tokens of ``category_ids[i]``, L = ``max_text_len``.
    """

    text: str
    category_ids: list[int]
    input_ids: torch.Tensor  # (T,) long, T <= L
    positive_map: torch.Tensor  # (C, L) float


def phrase_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Phrase index of every token, as the model's label maps see it; -1 on delimiters and padding.

    input_ids: (T,) long. A phrase is a maximal run of non-delimiter tokens; phrases count from 0.
    """
    delimiter = torch.isin(input_ids, torch.tensor(DELIMITER_IDS + (0,), device=input_ids.device))
    starts = (~delimiter) & torch.cat([torch.ones(1, dtype=torch.bool, device=input_ids.device), delimiter[:-1]])
    index = torch.cumsum(starts.long(), 0) - 1
    return torch.where(delimiter, torch.full_like(index, -1), index)


def clean_category_name(category_id: int, name: object) -> str:
    """Lower-cased, whitespace-normalized name; a clear error for an empty or non-text name."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"category id {category_id} has an empty name ({name!r}); every category needs a name")
    return " ".join(name.lower().split())


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def _make_prompt(tokenizer, names: list[tuple[int, str]], max_text_len: int) -> Prompt:
    text = "".join(f"{name} . " for _, name in names).strip()
    ids, offsets = _encode(tokenizer, text)
    if len(ids) > max_text_len:
        raise ValueError(f"prompt of {len(ids)} tokens exceeds max_text_len={max_text_len}: {text!r}")
    input_ids = torch.tensor(ids, dtype=torch.long)
    phrases = phrase_positions(input_ids)
    positive_map = torch.zeros(len(names), max_text_len)
    cursor = 0
    for position, (category_id, name) in enumerate(names):
        start = text.index(name, cursor)
        end = start + len(name)
        cursor = end
        tokens = [t for t, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end]
        expected = (phrases == position).nonzero().flatten().tolist()
        if not tokens or tokens != expected:
            raise ValueError(
                f"category id {category_id} name {name!r} does not form phrase {position} of the prompt "
                f"(its tokens {tokens}, the model's phrase tokens {expected}): a name must not contain "
                f"'.' or '?' and must tokenize to at least one token"
            )
        positive_map[position, tokens] = 1.0
    return Prompt(text=text, category_ids=[c for c, _ in names], input_ids=input_ids, positive_map=positive_map)


def build_prompts(categories: dict[int, str], tokenizer, max_text_len: int = 256) -> list[Prompt]:
    """Prompts covering all categories, split into several when they do not fit in ``max_text_len`` tokens.

    categories: dataset category id -> name, in the order the phrases should appear.
    Categories are packed greedily, in order; each prompt is validated by ``_make_prompt``.
    """
    if not categories:
        raise ValueError("no categories: a detection prompt needs at least one category name")
    names = [(cid, clean_category_name(cid, name)) for cid, name in categories.items()]
    prompts: list[Prompt] = []
    chunk: list[tuple[int, str]] = []
    used = 2  # [CLS] and [SEP]
    for category_id, name in names:
        cost = len(tokenizer(name, add_special_tokens=False)["input_ids"]) + 1  # its tokens and "."
        if cost + 2 > max_text_len:
            raise ValueError(f"category id {category_id} name {name!r} alone needs {cost + 2} tokens > max_text_len={max_text_len}")
        if chunk and used + cost > max_text_len:
            prompts.append(_make_prompt(tokenizer, chunk, max_text_len))
            chunk, used = [], 2
        chunk.append((category_id, name))
        used += cost
    prompts.append(_make_prompt(tokenizer, chunk, max_text_len))
    return prompts


def category_scores(logits: torch.Tensor, positive_map: torch.Tensor) -> torch.Tensor:
    """Per-category probabilities from token logits: mean of the token sigmoids of each phrase.

    logits: (B, Q, L) token logits; positive_map: (C, L). Returns (B, Q, C).
    """
    weights = positive_map / positive_map.sum(-1, keepdim=True).clamp(min=1)
    return logits.sigmoid() @ weights.to(logits.dtype).t()

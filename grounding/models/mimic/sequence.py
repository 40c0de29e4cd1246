"""L_SCE's sequence: the prompt template, the image-token expansion, the labels and the answer loss (docs/mimic.md
"The objective")."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

IGNORE_LABEL = -100
"""Label of positions the cross-entropy skips (transformers' convention)."""

LLAVA_PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
"""LLaVA-1.5's conversation format; ``<image>`` is the image placeholder, ``{prompt}`` the question."""


def check_prompt_template(template: str, name: str = "prompt_template") -> str:
    """``template`` when it holds the image placeholder ``<image>`` and the question's ``{prompt}``; else a
    ValueError naming the setting ``name``."""
    if "<image>" not in template or "{prompt}" not in template:
        raise ValueError(f"{name} must hold '<image>' and '{{prompt}}', got {template!r}")
    return template


def expand_image_tokens(
    input_ids: torch.Tensor, image_token_id: int, count: int, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace every ``image_token_id`` of ``input_ids`` (L,) by ``count`` copies, as a LLaVA processor does.

    labels: (L,) labels of the unexpanded sequence (None: IGNORE_LABEL everywhere); they are carried along with
    their tokens, and the expanded image positions get IGNORE_LABEL. Returns (input_ids, labels), both of length
    L + (count - 1) · (number of image tokens).
    """
    if input_ids.dim() != 1:
        raise ValueError(f"expand_image_tokens takes one sequence (L,), got shape {tuple(input_ids.shape)}")
    if count < 1:
        raise ValueError(f"the image expands into at least one token, got count={count}")
    labels = torch.full_like(input_ids, IGNORE_LABEL) if labels is None else labels
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in shape")
    is_image = input_ids == image_token_id
    repeats = torch.where(is_image, count, 1)
    ids = torch.repeat_interleave(input_ids, repeats)
    out_labels = torch.repeat_interleave(torch.where(is_image, IGNORE_LABEL, labels), repeats)
    return ids, out_labels


def build_sequence(
    prompt_ids: Sequence[int], answer_ids: Sequence[int], image_token_id: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training sequence of one (prompt, answer) pair: prompt tokens (with exactly one image placeholder)
    then answer tokens, the image expanded to ``count`` tokens. Labels are IGNORE_LABEL everywhere except on
    the answer tokens, which carry their own ids (the model shifts them: position t predicts token t + 1)."""
    occurrences = sum(int(t == image_token_id) for t in prompt_ids)
    if occurrences != 1:
        raise ValueError(f"the prompt must hold exactly one image token (id {image_token_id}); it holds {occurrences}")
    if not answer_ids:
        raise ValueError("the target answer has no token")
    ids = torch.tensor(list(prompt_ids) + list(answer_ids), dtype=torch.long)
    labels = torch.tensor([IGNORE_LABEL] * len(prompt_ids) + list(answer_ids), dtype=torch.long)
    return expand_image_tokens(ids, image_token_id, count, labels)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_SCE: mean cross-entropy of the labelled tokens. logits (B, L, V) at every position; labels (B, L), the
    token each position's NEXT position holds is predicted by it (shifted here), IGNORE_LABEL skipped."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:].to(shifted.device)
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_LABEL)

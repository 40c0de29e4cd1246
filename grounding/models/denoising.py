"""Contrastive denoising training (DINO's CDN) for transformers' Grounding DINO, through hooks.

transformers' ``GroundingDinoForObjectDetection`` (and ``MMGroundingDinoForObjectDetection``, which shares its
forward code, module names and loss) trains its decoder queries by Hungarian matching only;
the original Grounding DINO (as DINO) also feeds noised copies of the ground-truth boxes to the decoder and
asks it to reconstruct them (docs/image.md "Contrastive denoising"):

- per image, every ground-truth box gives a **positive** query (corners moved by less than half the box
  size × ``box_noise``) and a **negative** one (moved by 1 to 2 half-sizes × ``box_noise``); the label of a
  query is replaced by a random category of the prompt with probability ``label_noise`` / 2. The query's
  content is a learned embedding of its (noised) label, its reference box is the noised box.
- ``groups = number // (largest box count in the batch)`` copies of that set, each padded to
  2 × the largest box count (DINO's dynamic group count; at least one group).
- the attention mask: the matching queries never see a denoising query (so the matching part computes
  exactly what it computes without denoising) and a group never sees another group.
- the positives reconstruct their box (L1 + GIoU) and their label (the library's token focal loss); the
  negatives and the padding are trained towards "no object". The assignment is known, no matching.
  Weights as the matching loss of transformers (class 2, L1 ``bbox_loss_coefficient``, GIoU
  ``giou_loss_coefficient``), at every decoder layer when ``auxiliary_loss`` is on.

``denoising_training(model, queries)`` runs one training forward pass with the queries appended after the
matching ones: a pre-hook on ``model.model.decoder`` appends them with their attention mask, a hook on its
output keeps their states aside and hands the model only the matching queries, and a wrapper of the
model's ``loss_function`` adds the denoising terms to the library's loss (``loss_ce_dn``, ``loss_bbox_dn``,
``loss_giou_dn`` and per layer ``..._dn_<i>`` in ``loss_dict``). No model code is copied; everything is
removed when the block ends. Evaluation never uses it. The denoising queries are scored by the model's own
heads (``class_embed[l]``, ``bbox_embed[l]``), so MM-Grounding-DINO's scaled, biased class heads score them as
they score the matching queries.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torchvision.ops import box_convert
from transformers.loss.loss_grounding_dino import GroundingDinoImageLoss

from grounding.models.grounding_dino import GroundingDinoFamily

#: the weight transformers' Grounding DINO loss gives its token focal loss (fixed in the library)
CLASS_WEIGHT = 2.0


@dataclass
class DenoisingConfig:
    """Settings of contrastive denoising (docs/image.md "Contrastive denoising").

    Attributes:
        number: budget of denoising pairs per image: ``number // (largest box count of the batch)`` groups.
            0 turns denoising off (the loss is then exactly transformers'). DINO and Open-GroundingDino use 100.
        label_noise: a query's label is replaced by a uniformly drawn category of the prompt with probability
            ``label_noise / 2`` (DINO's convention; 0.5 in Open-GroundingDino).
        box_noise: scale λ of the corner noise in half box sizes: positives move by less than λ, negatives by
            λ to 2λ (1.0 in Open-GroundingDino, 0.4 in DINO).
    """

    number: int = 0
    label_noise: float = 0.5
    box_noise: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.number, bool) or not isinstance(self.number, int) or self.number < 0:
            raise ValueError(f"denoising.number must be an integer >= 0 (0 turns denoising off), got {self.number!r}")
        if not (isinstance(self.label_noise, (int, float)) and 0 <= self.label_noise <= 1):
            raise ValueError(f"denoising.label_noise must be in [0, 1], got {self.label_noise!r}")
        if not (isinstance(self.box_noise, (int, float)) and self.box_noise >= 0):
            raise ValueError(f"denoising.box_noise must be >= 0, got {self.box_noise!r}")

    @property
    def enabled(self) -> bool:
        return self.number > 0


@dataclass
class DenoisingQueries:
    """The denoising part of one batch.

    content (B, Qd, d_model) and reference (B, Qd, 4) (normalized cx, cy, w, h) of the Qd denoising queries;
    blocked (Qm + Qd, Qm + Qd) bool, True where query i may not attend to query j (matching queries first);
    targets (one dict per image: ``class_labels`` and ``boxes`` of every positive, group after group) and
    indices ((query positions, target positions) per image) for the loss; groups and group_size.
    """

    content: torch.Tensor
    reference: torch.Tensor
    blocked: torch.Tensor
    targets: list[dict]
    indices: list[tuple[torch.Tensor, torch.Tensor]]
    groups: int
    group_size: int

    @property
    def count(self) -> int:
        return self.content.shape[1]


def denoising_attention_mask(num_matching: int, groups: int, group_size: int, device=None) -> torch.Tensor:
    """(Qm + G·S)² bool, True = may not attend: matching rows never see denoising columns, a group never sees
    another group; denoising queries see the matching ones and their own group."""
    total = num_matching + groups * group_size
    blocked = torch.zeros(total, total, dtype=torch.bool, device=device)
    blocked[:num_matching, num_matching:] = True
    group = torch.arange(groups * group_size, device=device) // group_size
    blocked[num_matching:, num_matching:] = group[:, None] != group[None, :]
    return blocked


def noised_boxes(boxes: torch.Tensor, negative: bool | torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Move the corners of (..., 4) cx, cy, w, h boxes by ± u · half size · scale, u ∈ [0, 1) for positives and
    [1, 2) for negatives (independently per corner coordinate), clip to the image, back to cx, cy, w, h.
    negative: one flag for all boxes, or a bool tensor broadcastable to boxes.shape[:-1]."""
    corners = box_convert(boxes, "cxcywh", "xyxy")
    half = torch.cat([boxes[..., 2:]] * 2, -1) / 2  # (w, h, w, h) / 2
    sign = torch.randint(0, 2, corners.shape, generator=generator, device=boxes.device).to(boxes.dtype) * 2 - 1
    shift = torch.as_tensor(negative, dtype=boxes.dtype, device=boxes.device)
    amount = torch.rand(corners.shape, generator=generator, device=boxes.device, dtype=boxes.dtype) + (shift[..., None] if shift.dim() else shift)
    moved = (corners + sign * amount * half * scale).clamp(0.0, 1.0)
    return box_convert(moved, "xyxy", "cxcywh")


class ContrastiveDenoising(nn.Module):
    """The label embedding of the denoising queries and their construction for a batch.

    num_labels: size of the label table (the model's ``max_text_len`` bounds the categories of one prompt).
    """

    def __init__(self, config: DenoisingConfig, d_model: int, num_labels: int):
        super().__init__()
        self.config = config
        self.label_embedding = nn.Embedding(num_labels, d_model)

    def build(
        self, labels: list[dict], num_classes: int, num_matching: int, generator: torch.Generator | None = None
    ) -> DenoisingQueries | None:
        """Denoising queries of a batch, or None when the batch has no box (or denoising is off).

        labels: per image ``class_labels`` (n,) phrase positions in the prompt and ``boxes`` (n, 4) normalized
        cx, cy, w, h (the detector's ``labels``); num_classes: categories of the prompt (noised labels are
        drawn among them); num_matching: the model's ``num_queries``.
        """
        counts = [len(label["boxes"]) for label in labels]
        largest = max(counts, default=0)
        if not self.config.enabled or largest == 0:
            return None
        if num_classes > self.label_embedding.num_embeddings:
            raise ValueError(
                f"a prompt of {num_classes} categories exceeds the denoising label table ({self.label_embedding.num_embeddings})"
            )
        weight = self.label_embedding.weight
        device = weight.device
        groups = max(self.config.number // largest, 1)
        size = 2 * largest
        batch = len(labels)
        content = weight.new_zeros(batch, groups * size, weight.shape[1])
        reference = torch.full((batch, groups * size, 4), 0.5, device=device, dtype=weight.dtype)
        part = torch.tensor([False, True], device=device)[None, :, None]  # (1, 2, 1): positives, negatives
        targets, indices = [], []
        for b, label in enumerate(labels):
            n = counts[b]
            classes = label["class_labels"].to(device)
            boxes = label["boxes"].to(device=device, dtype=weight.dtype)
            # every query of the image at once, shaped (groups, 2, n): group g, part, box j at g·size + part·largest + j
            slots = (torch.arange(groups, device=device)[:, None, None] * size + part * largest
                     + torch.arange(n, device=device)[None, None, :])
            noisy = classes.expand(groups, 2, n)
            if n and self.config.label_noise > 0:
                flip = torch.rand(noisy.shape, generator=generator, device=device) < self.config.label_noise / 2
                drawn = torch.randint(0, num_classes, noisy.shape, generator=generator, device=device)
                noisy = torch.where(flip, drawn, noisy)
            content[b, slots.flatten()] = weight[noisy.flatten()]
            moved = noised_boxes(boxes.expand(groups, 2, n, 4), part.expand(groups, 2, n), self.config.box_noise, generator)
            reference[b, slots.flatten()] = moved.reshape(-1, 4)
            targets.append({"class_labels": classes.repeat(groups), "boxes": boxes.repeat(groups, 1)})
            indices.append((slots[:, 0].flatten().cpu(), torch.arange(groups * n)))
        blocked = denoising_attention_mask(num_matching, groups, size, device)
        return DenoisingQueries(content, reference, blocked, targets, indices, groups, size)

    def unused_term(self) -> torch.Tensor:
        """0 times the label table: a batch without boxes still gives every parameter a gradient (DDP)."""
        return self.label_embedding.weight.sum() * 0.0


class _KnownAssignment(nn.Module):
    """A 'matcher' that returns the denoising queries' known assignment, whatever the predictions."""

    def __init__(self, indices):
        super().__init__()
        self.indices = indices

    def forward(self, outputs, targets):
        return self.indices


class _DenoisingState:
    def __init__(self, queries: DenoisingQueries):
        self.queries = queries
        self.num_matching: int | None = None
        self.text_attention_mask: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None  # (B, L, Qd, d) decoder states of every layer
        self.references: torch.Tensor | None = None  # (B, L, Qd, 4) refined references after every layer
        self.text_hidden: torch.Tensor | None = None


def denoising_predictions(model: GroundingDinoFamily, state: _DenoisingState) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits (L, B, Qd, K) and boxes (L, B, Qd, 4) of the denoising queries at every decoder layer,
    from the model's own heads as it applies them to the matching queries."""
    logits, boxes = [], []
    for level in range(state.hidden.shape[1]):
        reference = state.queries.reference.to(state.hidden.dtype) if level == 0 else state.references[:, level - 1]
        hidden = state.hidden[:, level]
        logits.append(model.class_embed[level](
            vision_hidden_state=hidden, text_hidden_state=state.text_hidden, text_token_mask=state.text_attention_mask.bool()
        ))
        boxes.append((model.bbox_embed[level](hidden) + torch.special.logit(reference, eps=1e-5)).sigmoid())
    return torch.stack(logits), torch.stack(boxes)


def denoising_loss(
    logits: torch.Tensor, boxes: torch.Tensor, queries: DenoisingQueries, label_maps, text_mask: torch.Tensor, config
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted denoising loss and its terms, from the library's criterion with the known assignment.

    logits (L, B, Qd, K), boxes (L, B, Qd, 4): every decoder layer, the last one last. label_maps and
    text_mask as transformers builds them for the matching loss (text_mask: (B, Q, K) of the matching queries).
    """
    criterion = GroundingDinoImageLoss(_KnownAssignment(queries.indices), config.focal_alpha, ["labels", "boxes"])
    mask = text_mask[:, :1].expand(-1, logits.shape[2], -1)
    outputs = {"logits": logits[-1], "pred_boxes": boxes[-1], "label_maps": label_maps, "text_mask": mask}
    if logits.shape[0] > 1:
        outputs["auxiliary_outputs"] = [
            {"logits": logits[i], "pred_boxes": boxes[i], "label_maps": label_maps, "text_mask": mask} for i in range(logits.shape[0] - 1)
        ]
    terms = criterion(outputs, queries.targets)
    weights = {"loss_ce": CLASS_WEIGHT, "loss_bbox": config.bbox_loss_coefficient, "loss_giou": config.giou_loss_coefficient}
    total, named = 0.0, {}
    for name, value in terms.items():
        base, _, layer = name.rpartition("_") if name[-1].isdigit() else (name, "", "")  # "loss_ce_0": layer 0
        total = total + weights[base] * value
        named[f"{base}_dn_{layer}" if layer else f"{base}_dn"] = value
    return total, named


class _DenoisingLossFunction:
    """The model's loss function plus the denoising terms."""

    def __init__(self, loss_function, model: GroundingDinoFamily, state: _DenoisingState):
        self.loss_function = loss_function
        self.model = model
        self.state = state

    def __call__(self, *args, **kwargs):
        loss, loss_dict, auxiliary = self.loss_function(*args, **kwargs)
        if self.state.hidden is None:
            return loss, loss_dict, auxiliary
        names = ("logits", "labels", "device", "pred_boxes", "config", "label_maps", "text_mask")
        given = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
        logits, boxes = denoising_predictions(self.model, self.state)
        total, terms = denoising_loss(logits, boxes, self.state.queries, given["label_maps"], given["text_mask"], given["config"])
        self.state.hidden = None
        loss_dict = dict(loss_dict, **terms)
        return loss + total, loss_dict, auxiliary


@contextlib.contextmanager
def denoising_training(model: GroundingDinoFamily, queries: DenoisingQueries | None) -> Iterator[None]:
    """Inside the block, forward passes with ``labels`` also train the denoising queries (module docstring).
    ``queries=None`` (no box in the batch, or denoising off) leaves the model as it is."""
    if queries is None:
        yield
        return
    state = _DenoisingState(queries)
    config = model.config
    decoder = model.model.decoder

    def before_model(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        state.text_attention_mask = mask if mask is not None else torch.ones_like(kwargs["input_ids"])

    def after_model(module, args, kwargs, output):
        state.text_hidden = output.encoder_last_hidden_state_text

    def before_decoder(module, args, kwargs):
        if args:
            raise RuntimeError("denoising_training expects the decoder to be called with keyword arguments, as transformers does")
        embeds, reference = kwargs["inputs_embeds"], kwargs["reference_points"]
        if reference.shape[-1] != 4:
            raise ValueError("contrastive denoising needs 4-coordinate reference points (two-stage or box queries)")
        state.num_matching = embeds.shape[1]
        kwargs["inputs_embeds"] = torch.cat([embeds, queries.content.to(embeds.dtype)], 1)
        kwargs["reference_points"] = torch.cat([reference, queries.reference.to(reference.dtype)], 1)
        additive = torch.zeros(queries.blocked.shape, dtype=embeds.dtype, device=embeds.device)
        kwargs["self_attn_mask"] = additive.masked_fill(queries.blocked.to(embeds.device), torch.finfo(embeds.dtype).min)
        # the decoder repeats the text padding mask over config.num_queries rows: all queries, while it runs
        config.num_queries = state.num_matching + queries.count
        return args, kwargs

    def after_decoder(module, args, output):
        config.num_queries = state.num_matching
        if not hasattr(output, "intermediate_hidden_states"):
            raise RuntimeError("denoising_training needs the decoder's ModelOutput (return_dict=True)")
        q = state.num_matching
        state.hidden = output.intermediate_hidden_states[:, :, q:]
        state.references = output.intermediate_reference_points[:, :, q:]
        output.last_hidden_state = output.last_hidden_state[:, :q]
        output.intermediate_hidden_states = output.intermediate_hidden_states[:, :, :q]
        output.intermediate_reference_points = output.intermediate_reference_points[:, :, :q]
        if output.hidden_states is not None:
            output.hidden_states = tuple(h[:, :q] for h in output.hidden_states)
        return output

    num_queries = config.num_queries
    had_own = "_loss_function" in vars(model)
    previous = model.loss_function
    handles = [
        model.model.register_forward_pre_hook(before_model, with_kwargs=True),
        model.model.register_forward_hook(after_model, with_kwargs=True),
        decoder.register_forward_pre_hook(before_decoder, with_kwargs=True),
        decoder.register_forward_hook(after_decoder),
    ]
    model.loss_function = _DenoisingLossFunction(previous, model, state)
    try:
        yield
    finally:
        config.num_queries = num_queries
        for handle in handles:
            handle.remove()
        if had_own:
            model.loss_function = previous
        else:
            del model._loss_function

"""Referring-expression comprehension (REC) accuracy@k at IoU ≥ 0.5, per split, summed across processes.

For each expression the predicted boxes are ranked by score, highest first; equal scores keep the order in
which the boxes were given (a stable sort, so a model's own ranking decides ties). The expression is
correct at k when one of its k best-ranked boxes overlaps a ground-truth box of the expression with
IoU ≥ ``iou_threshold`` (0.5; inclusive, as in mmdetection's ``RefExpMetric`` and MDETR's
``RefExpEvaluator``). RefCOCO/+/g have exactly one ground-truth box per expression; several boxes are
accepted, and a hit on any of them counts. An expression without any predicted box is wrong at every k;
with fewer than k boxes, all of them are its top k. accuracy@k = correct@k / expressions.

Boxes are (x0, y0, x1, y1) in pixels of the original image, both predicted and ground truth (RefCOCO's
annotation files store [x, y, w, h]: give (x, y, x + w, y + h)); IoU is computed in float64 without the
legacy +1 pixel (areas (x1 - x0)(y1 - y0)). ``overlap="giou"`` ranks the same way but tests generalized
IoU ≥ the threshold instead, which is what MDETR's evaluation code computes (``generalized_box_iou``);
the default is plain IoU, as mmdetection computes it (``bbox_overlaps``). MDETR also sorts with
Python's ``sorted`` over (score, box) pairs, which breaks score ties by box coordinates; this module does not.

``rec_accuracy`` computes the numbers from plain lists; ``ReferringExpressionAccuracy`` is the torchmetrics
``Metric`` with sum states (hits per k, expressions), so a distributed reduction is a plain sum: every
evaluation loader reads each sample on exactly one process (``grounding.data.sampling.evaluation_sampler``).
The ranking and hit test shared with phrase grounding (``grounding.metrics.phrase_grounding``) live here.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
from torchmetrics import Metric

#: the k of accuracy@k / Recall@k reported by MDETR and mmdetection
DEFAULT_KS = (1, 5, 10)
OVERLAPS = ("iou", "giou")


def as_boxes(boxes, what: str = "boxes") -> torch.Tensor:
    """(n, 4) float64 CPU tensor of (x0, y0, x1, y1) boxes from a tensor or nested lists; a single box
    (4,) becomes (1, 4), an empty list (0, 4). Raises ValueError for a non-finite box or x1 < x0 / y1 < y0."""
    tensor = torch.as_tensor(boxes.detach() if isinstance(boxes, torch.Tensor) else boxes, dtype=torch.float64).cpu()
    if tensor.numel() == 0:
        return tensor.reshape(0, 4)
    if tensor.dim() == 1:
        tensor = tensor.reshape(1, -1)
    if tensor.dim() != 2 or tensor.shape[1] != 4:
        raise ValueError(f"{what} must be (n, 4) (x0, y0, x1, y1); got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} hold a non-finite coordinate: {tensor[~torch.isfinite(tensor).all(dim=1)][0].tolist()}")
    inverted = (tensor[:, 2] < tensor[:, 0]) | (tensor[:, 3] < tensor[:, 1])
    if inverted.any():
        raise ValueError(f"{what} must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0; got {tensor[inverted][0].tolist()}")
    return tensor


def box_overlaps(boxes: torch.Tensor, others: torch.Tensor, overlap: str = "iou") -> torch.Tensor:
    """(n, m) IoU (or generalized IoU) of (n, 4) and (m, 4) xyxy float64 boxes; a pair whose union is empty
    (two zero-area boxes) overlaps 0."""
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {OVERLAPS}; got {overlap!r}")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    other_area = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    low = torch.maximum(boxes[:, None, :2], others[None, :, :2])
    high = torch.minimum(boxes[:, None, 2:], others[None, :, 2:])
    size = (high - low).clamp(min=0)
    intersection = size[..., 0] * size[..., 1]
    union = area[:, None] + other_area[None, :] - intersection
    iou = torch.where(union > 0, intersection / union.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(union))
    if overlap == "iou":
        return iou
    hull = (torch.maximum(boxes[:, None, 2:], others[None, :, 2:]) - torch.minimum(boxes[:, None, :2], others[None, :, :2])).clamp(min=0)
    hull_area = hull[..., 0] * hull[..., 1]
    penalty = torch.where(hull_area > 0, (hull_area - union) / hull_area.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(hull_area))
    return iou - penalty


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Indices of the predictions, highest score first; equal scores keep their given order (stable sort)."""
    return torch.sort(scores, descending=True, stable=True).indices


def first_hit_rank(boxes, scores, gt_boxes, iou_threshold: float = 0.5, overlap: str = "iou") -> int | None:
    """1-based rank of the best-ranked predicted box whose overlap with any box of ``gt_boxes`` is
    ≥ ``iou_threshold``; None when no predicted box reaches it (or there is none). A query is a hit at k
    exactly when this rank is ≤ k."""
    boxes = as_boxes(boxes, "predicted boxes")
    gt_boxes = as_boxes(gt_boxes, "ground-truth boxes")
    scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu().reshape(-1)
    if scores.numel() != boxes.shape[0]:
        raise ValueError(f"{boxes.shape[0]} predicted boxes for {scores.numel()} scores")
    if torch.isnan(scores).any():
        raise ValueError("predicted scores hold NaN: the ranking would be undefined")
    if boxes.shape[0] == 0 or gt_boxes.shape[0] == 0:
        return None
    order = ranking(scores)
    reaches = box_overlaps(boxes[order], gt_boxes, overlap).max(dim=1).values >= iou_threshold
    hits = torch.nonzero(reaches).flatten()
    return int(hits[0]) + 1 if hits.numel() else None


def topk_hits(boxes, scores, gt_boxes, ks: Sequence[int] = DEFAULT_KS, iou_threshold: float = 0.5, overlap: str = "iou") -> tuple[bool, ...]:
    """For each k: does one of the k best-ranked predicted boxes overlap a ground-truth box ≥ the threshold?"""
    rank = first_hit_rank(boxes, scores, gt_boxes, iou_threshold, overlap)
    return tuple(rank is not None and rank <= k for k in check_ks(ks))


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct positive integers; got {ks}")
    return ks


def summary(hits: torch.Tensor, counts: torch.Tensor, ks: Sequence[int], groups: Sequence[str], name: str) -> dict[str, float]:
    """``{f"{name}@{k}", "count"}`` of row 0 (everything) and ``{f"{group}/{name}@{k}", f"{group}/count"}`` of
    rows 1.. (one per group); a rate over no query is NaN."""
    values: dict[str, float] = {}
    for row, prefix in enumerate(["", *(f"{group}/" for group in groups)]):
        total = int(counts[row])
        for column, k in enumerate(ks):
            values[f"{prefix}{name}@{k}"] = int(hits[row, column]) / total if total else math.nan
        values[f"{prefix}count"] = float(total)
    return values


def tally(hits: torch.Tensor, counts: torch.Tensor, rank: int | None, rows: Sequence[int], ks: Sequence[int]) -> None:
    """Adds one query whose first hit is at ``rank`` (None: no hit) to ``hits`` / ``counts`` in place, in
    each of ``rows`` (0: every query, 1 + g: group g)."""
    hit = torch.tensor([rank is not None and rank <= k for k in ks], dtype=hits.dtype, device=hits.device)
    for row in rows:
        hits[row] += hit
        counts[row] += 1


def group_rows(groups: Sequence[str], members: Iterable[str]) -> list[int]:
    """Rows of a query that belongs to ``members`` (each a name of ``groups``): 0, then 1 + g per group."""
    rows = [0]
    for member in members:
        if member not in groups:
            raise ValueError(f"{member!r} is none of the groups this evaluation was set up with: {list(groups)}")
        if 1 + groups.index(member) not in rows:
            rows.append(1 + groups.index(member))
    return rows


class GroupedTopKHits(Metric):
    """Sum states of top-k hits: ``hits`` (1 + groups, len(ks)) and ``counts`` (1 + groups,), row 0 for every
    query, row 1 + g for the queries of group g (a split, a phrase type). Subclasses ``tally`` each query of
    their ``update``; ``compute`` returns ``summary`` as float64 tensors."""

    full_state_update = False
    rate_name = "acc"

    def __init__(self, ks: Sequence[int], iou_threshold: float, overlap: str, groups: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        if overlap not in OVERLAPS:
            raise ValueError(f"overlap must be one of {OVERLAPS}; got {overlap!r}")
        if not 0.0 <= iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1]; got {iou_threshold}")
        self.ks = check_ks(ks)
        self.iou_threshold = float(iou_threshold)
        self.overlap = overlap
        self.groups = tuple(groups)
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"group names must be distinct; got {self.groups}")
        self.add_state("hits", default=torch.zeros(1 + len(self.groups), len(self.ks), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("counts", default=torch.zeros(1 + len(self.groups), dtype=torch.long), dist_reduce_fx="sum")

    def compute(self) -> dict[str, torch.Tensor]:
        values = summary(self.hits.cpu(), self.counts.cpu(), self.ks, self.groups, self.rate_name)
        return {key: torch.tensor(value, dtype=torch.float64) for key, value in values.items()}


def names_in(records: Sequence[Mapping], key: str) -> list[str]:
    """The distinct values of ``record[key]`` (a name or a list of names) over ``records``, in order of appearance."""
    names: list[str] = []
    for record in records:
        values = record.get(key)
        for value in ([] if values is None else [values] if isinstance(values, str) else values):
            if value not in names:
                names.append(value)
    return names


def rec_accuracy(records: Iterable[Mapping], ks: Sequence[int] = DEFAULT_KS, iou_threshold: float = 0.5, overlap: str = "iou",
                 splits: Sequence[str] | None = None) -> dict[str, float]:
    """accuracy@k of referring expressions given as plain mappings, one per expression:
    ``{"boxes": [[x0, y0, x1, y1], ...], "scores": [...], "gt_boxes": [[x0, y0, x1, y1], ...] (or one box),
    "split": "testA"}`` ("split" optional). Returns ``acc@k`` and ``count`` over every expression and
    ``{split}/acc@k``, ``{split}/count`` per split (``splits``: their order; default: order of appearance).
    The same numbers as ``ReferringExpressionAccuracy`` over the same expressions, without a ``Metric``."""
    records = list(records)
    ks = check_ks(ks)
    groups = tuple(names_in(records, "split") if splits is None else splits)
    hits = torch.zeros(1 + len(groups), len(ks), dtype=torch.long)
    counts = torch.zeros(1 + len(groups), dtype=torch.long)
    for index, record in enumerate(records):
        if as_boxes(record["gt_boxes"], "ground-truth boxes").shape[0] == 0:
            raise ValueError(f"expression {index} has no ground-truth box")
        rank = first_hit_rank(record["boxes"], record["scores"], record["gt_boxes"], iou_threshold, overlap)
        split = record.get("split")
        tally(hits, counts, rank, group_rows(groups, [] if split is None else [split]), ks)
    return summary(hits, counts, ks, groups, "acc")


class ReferringExpressionAccuracy(GroupedTopKHits):
    """REC accuracy@k (module docstring); ``compute`` returns ``acc@k`` and ``count`` over every expression
    and, for each split named at construction, ``{split}/acc@k`` and ``{split}/count`` (float64 tensors,
    NaN where no expression was counted).

    update(boxes: list of (n_i, 4) xyxy pixels, scores: list of (n_i,), gt_boxes: list of (m_i, 4) xyxy or
    (4,), splits: list of split names (one per expression) or None: counted in the totals only). One list
    entry per expression; an expression without predictions is given as an empty (0, 4) box tensor and
    counts as wrong.
    """

    rate_name = "acc"

    def __init__(self, ks: Sequence[int] = DEFAULT_KS, iou_threshold: float = 0.5, overlap: str = "iou",
                 splits: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(ks, iou_threshold, overlap, groups=() if splits is None else splits, **kwargs)

    def update(self, boxes: Sequence, scores: Sequence, gt_boxes: Sequence, splits: Sequence[str] | None = None) -> None:
        if not len(boxes) == len(scores) == len(gt_boxes):
            raise ValueError(f"{len(boxes)} box sets, {len(scores)} score sets and {len(gt_boxes)} ground truths: one each per expression")
        if splits is not None and len(splits) != len(boxes):
            raise ValueError(f"{len(splits)} split names for {len(boxes)} expressions")
        for index, (expression_boxes, expression_scores, expression_gt) in enumerate(zip(boxes, scores, gt_boxes)):
            if as_boxes(expression_gt, "ground-truth boxes").shape[0] == 0:
                raise ValueError(f"expression {index} of the batch has no ground-truth box")
            rank = first_hit_rank(expression_boxes, expression_scores, expression_gt, self.iou_threshold, self.overlap)
            tally(self.hits, self.counts, rank, group_rows(self.groups, [] if splits is None else [splits[index]]), self.ks)

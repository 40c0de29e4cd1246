"""Flickr30k Entities phrase grounding Recall@k ("any-box" protocol, as MDETR evaluates it), summed across processes.

For each phrase the predicted boxes are ranked by score, highest first, equal scores in their given order
(a stable sort); the phrase is a hit at k when one of its k best-ranked boxes has IoU ≥ ``iou_threshold``
(0.5, inclusive) with any of the phrase's ground-truth boxes (a phrase of Flickr30k Entities can refer to
several boxes: "two dogs"). Recall@k = hits@k / phrases. Phrases without any ground-truth box (Flickr30k
Entities' "nobox" and scene-only phrases) are not counted at all, as MDETR's evaluator filters them; a
phrase without any predicted box is counted and missed at every k. With ``merge_boxes=True`` (MDETR's
"merged" protocol) the ground-truth boxes of a phrase are first replaced by their union box, the smallest
box enclosing them all, (min x0, min y0, max x1, max y1), and a hit needs IoU ≥ the threshold with it.

Boxes are (x0, y0, x1, y1) pixels, IoU without the legacy +1 pixel, as in MDETR's ``flickr_eval.py``
(``grounding.metrics.rec`` holds the shared ranking and IoU). Optionally Recall@k per phrase type
(``phrase_types``: Flickr30k Entities' coarse types, ``FLICKR30K_PHRASE_TYPES``): a phrase of several types
counts in each of them, as in MDETR. ``phrase_grounding_recall`` computes the numbers from plain lists;
``PhraseGroundingRecall`` is the torchmetrics ``Metric`` whose states are sums (every evaluation sample is
read on exactly one process, ``grounding.data.sampling.evaluation_sampler``), so its distributed reduction
is a plain sum.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from grounding.metrics.rec import (
    DEFAULT_KS,
    GroupedTopKHits,
    as_boxes,
    check_ks,
    first_hit_rank,
    group_rows,
    names_in,
    summary,
    tally,
)

#: the coarse phrase types of Flickr30k Entities' sentence files (Plummer et al.)
FLICKR30K_PHRASE_TYPES = ("people", "clothing", "bodyparts", "animals", "vehicles", "instruments", "scene", "other")


def union_box(gt_boxes) -> torch.Tensor:
    """(1, 4) smallest box enclosing every (x0, y0, x1, y1) box of ``gt_boxes``; (0, 4) for no box."""
    boxes = as_boxes(gt_boxes, "ground-truth boxes")
    if boxes.shape[0] == 0:
        return boxes
    return torch.cat([boxes[:, :2].min(dim=0).values, boxes[:, 2:].max(dim=0).values]).reshape(1, 4)


def _phrase_rank(boxes, scores, gt_boxes, iou_threshold: float, merge_boxes: bool) -> tuple[bool, int | None]:
    """(counted, first hit rank) of one phrase: not counted without ground-truth boxes."""
    gt = as_boxes(gt_boxes, "ground-truth boxes")
    if gt.shape[0] == 0:
        return False, None
    return True, first_hit_rank(boxes, scores, union_box(gt) if merge_boxes else gt, iou_threshold)


def _types_of(types) -> list[str]:
    return [] if types is None else [types] if isinstance(types, str) else list(types)


def phrase_grounding_recall(records: Iterable[Mapping], ks: Sequence[int] = DEFAULT_KS, iou_threshold: float = 0.5,
                            merge_boxes: bool = False, phrase_types: Sequence[str] | None = None) -> dict[str, float]:
    """Recall@k of phrases given as plain mappings, one per phrase: ``{"boxes": [[x0, y0, x1, y1], ...],
    "scores": [...], "gt_boxes": [[x0, y0, x1, y1], ...], "phrase_types": ["people", ...]}``
    ("phrase_types" optional). Returns ``R@k`` and ``count`` (phrases counted) and, per phrase type,
    ``{type}/R@k`` and ``{type}/count`` (``phrase_types``: which and in what order; default: the types met,
    in order of appearance). The same numbers as ``PhraseGroundingRecall``, without a ``Metric``."""
    records = list(records)
    ks = check_ks(ks)
    groups = tuple(names_in(records, "phrase_types") if phrase_types is None else phrase_types)
    hits = torch.zeros(1 + len(groups), len(ks), dtype=torch.long)
    counts = torch.zeros(1 + len(groups), dtype=torch.long)
    for record in records:
        counted, rank = _phrase_rank(record["boxes"], record["scores"], record["gt_boxes"], iou_threshold, merge_boxes)
        if counted:
            tally(hits, counts, rank, group_rows(groups, _types_of(record.get("phrase_types"))), ks)
    return summary(hits, counts, ks, groups, "R")


class PhraseGroundingRecall(GroupedTopKHits):
    """Flickr30k Entities Recall@k (module docstring); ``compute`` returns ``R@k`` and ``count`` (phrases
    with ground truth) and, for each phrase type named at construction, ``{type}/R@k`` and ``{type}/count``
    (float64 tensors, NaN where no phrase was counted).

    update(boxes: list of (n_i, 4) xyxy pixels, scores: list of (n_i,), gt_boxes: list of (m_i, 4) xyxy,
    phrase_types: list (one per phrase) of a type name or a list of them, or None). One list entry per
    phrase; a phrase with m_i = 0 is skipped, one with n_i = 0 counts as missed.
    """

    rate_name = "R"

    def __init__(self, ks: Sequence[int] = DEFAULT_KS, iou_threshold: float = 0.5, merge_boxes: bool = False,
                 phrase_types: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(ks, iou_threshold, "iou", groups=() if phrase_types is None else phrase_types, **kwargs)
        self.merge_boxes = bool(merge_boxes)

    def update(self, boxes: Sequence, scores: Sequence, gt_boxes: Sequence, phrase_types: Sequence | None = None) -> None:
        if not len(boxes) == len(scores) == len(gt_boxes):
            raise ValueError(f"{len(boxes)} box sets, {len(scores)} score sets and {len(gt_boxes)} ground truths: one each per phrase")
        if phrase_types is not None and len(phrase_types) != len(boxes):
            raise ValueError(f"{len(phrase_types)} phrase type entries for {len(boxes)} phrases")
        for index, (phrase_boxes, phrase_scores, phrase_gt) in enumerate(zip(boxes, scores, gt_boxes)):
            counted, rank = _phrase_rank(phrase_boxes, phrase_scores, phrase_gt, self.iou_threshold, self.merge_boxes)
            if counted:
                rows = group_rows(self.groups, [] if phrase_types is None else _types_of(phrase_types[index]))
                tally(self.hits, self.counts, rank, rows, self.ks)

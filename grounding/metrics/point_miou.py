"""p-mIoU: zero-shot point prediction scored on OpenImages V7 point labels (docs/gem.md, "p-mIoU").

For each image and each class with points in it, the method's map (H, W) is min-max scaled to [0, 1] and
thresholded (> 0.5) into a mask; the class's points are then counted: TP = positive points inside the mask,
FP = negative points inside, FN = positive points outside (negative points outside are true negatives and
count nowhere). TP / FP / FN are summed per class over the whole dataset (the OpenImages V7 protocol: a class's
IoU is over all its points), IoU_c = TP / (TP + FP + FN), and p-mIoU is the mean of IoU_c over the classes where
TP + FP + FN > 0 (a class whose only points are negatives that no mask covers has no defined IoU).

Points are continuous pixel coordinates (x, y) (pixel (i, j) covers x in [j, j + 1), y in [i, i + 1)); a point
reads the mask at (floor(y), floor(x)), clamped into the image so that x = W (normalized X = 1) reads column W - 1.

``PointMIoU`` (a torchmetrics ``Metric``) sums the per-class counts over updates and processes; every evaluation
loader reads each image on exactly one process (``grounding.data.sampling.evaluation_sampler``), so each image
counts once.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics import Metric


def min_max_scale(maps: torch.Tensor) -> torch.Tensor:
    """maps (C', H, W) -> float32 (C', H, W), each map scaled to [0, 1]; a constant map becomes all zeros
    (nothing stands out, so nothing is predicted)."""
    maps = maps.float()
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = flat.max(dim=1).values[:, None, None] - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (maps - low) / safe, torch.zeros_like(maps))


def point_pixels(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """points (P, 2) pixel coordinates (x, y) in [0, W] x [0, H] -> (P, 2) long (row, col) of the pixel each
    falls in (floor, the far edges clamped to the last row / column)."""
    valid = torch.isfinite(points).all(1) & (points >= 0).all(1) & (points[:, 0] <= width) & (points[:, 1] <= height)
    if not valid.all():
        bad = points[~valid][0]
        raise ValueError(f"point ({bad[0].item()}, {bad[1].item()}) lies outside the {width}x{height} map")
    cols = points[:, 0].floor().long().clamp(max=width - 1)
    rows = points[:, 1].floor().long().clamp(max=height - 1)
    return torch.stack([rows, cols], dim=1)


def point_counts(
    maps: torch.Tensor, classes: Sequence[int], points: torch.Tensor, point_classes: torch.Tensor,
    point_labels: torch.Tensor, threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(TP, FP, FN), each long (C',), of one image; entry i belongs to ``classes[i]``.

    maps: (C', H, W) the method's map of each class of ``classes`` (any scale: min-max scaled here);
    classes: C' distinct class indices; points: (P, 2) pixel coordinates (x, y) (see ``point_pixels``);
    point_classes: (P,) each point's class, one of ``classes``; point_labels: (P,) 1 positive, 0 negative.
    A class of ``classes`` without points gets zero counts.
    """
    classes = [int(c) for c in classes]
    if maps.dim() != 3 or maps.shape[0] != len(classes):
        raise ValueError(f"maps must be (C', H, W) with C' = {len(classes)} classes; got {tuple(maps.shape)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct; got {classes}")
    p = points.shape[0] if points.dim() == 2 else -1
    if points.dim() != 2 or points.shape[1] != 2 or point_classes.shape != (p,) or point_labels.shape != (p,):
        raise ValueError(
            f"points must be (P, 2) with point_classes and point_labels (P,); got {tuple(points.shape)},"
            f" {tuple(point_classes.shape)}, {tuple(point_labels.shape)}"
        )
    labels = point_labels.long().tolist()
    if any(label not in (0, 1) for label in labels):
        raise ValueError(f"point_labels must be 1 (positive) or 0 (negative); got {sorted(set(labels) - {0, 1})}")
    row_of_class = {c: i for i, c in enumerate(classes)}
    missing = sorted(set(point_classes.long().tolist()) - set(row_of_class))
    if missing:
        raise ValueError(f"points of class {missing} have no map (classes: {classes})")
    device = maps.device
    rows = torch.tensor([row_of_class[c] for c in point_classes.long().tolist()], dtype=torch.long, device=device)
    pixel = point_pixels(points.to(device), maps.shape[1], maps.shape[2])
    inside = (min_max_scale(maps) > threshold)[rows, pixel[:, 0], pixel[:, 1]]
    positive = point_labels.to(device) == 1
    c = len(classes)
    return (
        torch.bincount(rows[inside & positive], minlength=c),
        torch.bincount(rows[inside & ~positive], minlength=c),
        torch.bincount(rows[~inside & positive], minlength=c),
    )


def point_scores(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> dict[str, torch.Tensor]:
    """``p-mIoU`` (nanmean over classes) and per-class ``IoU`` (C,) float64 (NaN where TP + FP + FN = 0) of
    (C,) count sums; ``TP``, ``FP``, ``FN`` passed through."""
    tp, fp, fn = tp.long(), fp.long(), fn.long()
    iou = tp.double() / (tp + fp + fn).double()
    return {"p-mIoU": iou.nanmean(), "IoU": iou, "TP": tp, "FP": fp, "FN": fn}


class PointMIoU(Metric):
    """p-mIoU over all updates and processes (see the module docstring).

    ``update(maps, classes, points, point_classes, point_labels)``: one image, arguments as in ``point_counts``.
    ``compute()``: ``point_scores`` of the (num_classes,) TP / FP / FN sums (a dict; see there).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_classes: int, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
        self.num_classes, self.threshold = num_classes, threshold
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, maps: torch.Tensor, classes: Sequence[int], points: torch.Tensor, point_classes: torch.Tensor,
               point_labels: torch.Tensor) -> None:
        bad = [int(c) for c in classes if not 0 <= int(c) < self.num_classes]
        if bad:
            raise ValueError(f"class {bad[0]} is outside [0, {self.num_classes})")
        tp, fp, fn = (t.to(self.device) for t in point_counts(maps, classes, points, point_classes, point_labels, self.threshold))
        index = torch.tensor([int(c) for c in classes], dtype=torch.long, device=self.device)
        self.tp.index_add_(0, index, tp)
        self.fp.index_add_(0, index, fp)
        self.fn.index_add_(0, index, fn)

    def counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(TP, FP, FN), each long (num_classes,) (of this process's updates; after ``sync``, of all processes)."""
        return self.tp.clone(), self.fp.clone(), self.fn.clone()

    def compute(self) -> dict[str, torch.Tensor]:
        return point_scores(*self.counts())

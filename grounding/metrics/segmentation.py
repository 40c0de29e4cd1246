"""Semantic-segmentation scores (mIoU, mAcc, pixel accuracy) from an exact confusion matrix.

``confusion_matrix`` counts pixels (rows: ground truth, columns: prediction; pixels whose ground truth
is ``ignore_index`` are left out) with torchmetrics' ``multiclass_confusion_matrix``;
``iou_from_confusion`` / ``accuracy_from_confusion`` give the per-class scores: IoU_c = TP / (TP + FP + FN),
Acc_c = TP / (TP + FN). A class that never occurs, neither in the ground truth nor in the predictions,
has IoU NaN (0 / 0) and is left out of the mean (nanmean); a class absent from the ground truth has Acc
NaN, likewise left out of mAcc. docs/invseg.md describes the evaluation.

``SegmentationMetric`` (a torchmetrics ``Metric``) sums confusion matrices across batches and processes.
Every evaluation loader reads each image on exactly one process (``grounding.data.sampling.evaluation_sampler``),
so the sum counts each image once.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_confusion_matrix

from grounding.constants import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(C, C) int64 pixel counts, entry [t, p] = pixels of ground truth t predicted as p.

    pred, target: integer label maps of the same shape, (H, W) or (B, H, W); C = num_classes. Pixels whose
    target is ``ignore_index`` are not counted (whatever their prediction); every other target and
    prediction must lie in [0, C).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(target.shape)} differ in shape")
    if pred.is_floating_point() or target.is_floating_point() or pred.dtype == torch.bool:
        raise ValueError(f"label maps must hold integer class indices; got {pred.dtype} and {target.dtype}")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} is a class index (num_classes {num_classes}); it must lie outside [0, C)")
    valid = target != ignore_index
    for name, values in (("ground truth", target[valid]), ("prediction", pred[valid])):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            bad = values[(values < 0) | (values >= num_classes)][0].item()
            raise ValueError(f"{name} holds label {bad}, outside [0, {num_classes}) (ignore_index {ignore_index} excepted)")
    # the label checks above are the validation; torchmetrics' own does not range-check integer labels
    return multiclass_confusion_matrix(
        pred.reshape(-1).long(), target.reshape(-1).long(), num_classes, ignore_index=ignore_index, validate_args=False
    )


def iou_from_confusion(matrix: torch.Tensor) -> torch.Tensor:
    """(C,) float64 IoU per class of a (C, C) confusion matrix (rows: truth); NaN where TP + FP + FN = 0."""
    matrix = matrix.double()
    tp = matrix.diagonal()
    return tp / (matrix.sum(dim=1) + matrix.sum(dim=0) - tp)


def accuracy_from_confusion(matrix: torch.Tensor) -> torch.Tensor:
    """(C,) float64 accuracy (recall) per class of a (C, C) confusion matrix; NaN for classes not in the truth."""
    matrix = matrix.double()
    return matrix.diagonal() / matrix.sum(dim=1)


def segmentation_scores(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """``mIoU``, ``mAcc`` (nanmeans over classes), ``aAcc`` (pixel accuracy), per-class ``IoU`` and ``Acc`` (C,)
    of a (C, C) confusion matrix; all in [0, 1], float64."""
    iou, acc = iou_from_confusion(matrix), accuracy_from_confusion(matrix)
    total = matrix.sum().double()
    return {
        "mIoU": iou.nanmean(),
        "mAcc": acc.nanmean(),
        "aAcc": matrix.diagonal().sum().double() / total,
        "IoU": iou,
        "Acc": acc,
    }


def format_iou_table(class_names: Sequence[str], iou: torch.Tensor, acc: torch.Tensor) -> str:
    """A Markdown table of per-class IoU and Acc (C,) in percent, NaN as "-", and a last row of the nanmeans."""
    if not len(class_names) == len(iou) == len(acc):
        raise ValueError(f"{len(class_names)} class names for {len(iou)} IoU and {len(acc)} Acc values")

    def cell(value: float) -> str:
        return "-" if math.isnan(value) else f"{100 * value:.2f}"

    rows = ["| class | IoU | Acc |", "| --- | ---: | ---: |"]
    rows += [f"| {name} | {cell(i)} | {cell(a)} |" for name, i, a in zip(class_names, iou.tolist(), acc.tolist())]
    rows.append(f"| mean | {cell(iou.double().nanmean().item())} | {cell(acc.double().nanmean().item())} |")
    return "\n".join(rows)


class SegmentationMetric(Metric):
    """mIoU / mAcc / aAcc over all updates and processes (see the module docstring).

    ``update(pred, target)``: pred, target (H, W) or (B, H, W) integer label maps.
    ``compute()``: ``segmentation_scores`` of the summed confusion matrix (a dict; see there).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.add_state("matrix", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.dim() == 2:
            pred, target = pred[None], target[None]
        if pred.dim() != 3 or target.dim() != 3:
            raise ValueError(f"label maps must be (H, W) or (B, H, W); got {tuple(pred.shape)} and {tuple(target.shape)}")
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index).to(self.matrix.device)

    def confusion(self) -> torch.Tensor:
        """(C, C) int64 summed confusion matrix (of this process's updates; after ``sync``, of all processes)."""
        return self.matrix.clone()

    def compute(self) -> dict[str, torch.Tensor]:
        return segmentation_scores(self.confusion())

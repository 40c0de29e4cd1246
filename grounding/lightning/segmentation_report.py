"""The end of a segmentation evaluation, shared by every segmentation method (InvSeg, GEM): the scores
logged, the per-class IoU table in the log, in TensorBoard and in ``<run>/predictions/<name>_<split>_iou.md``."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from grounding.metrics.segmentation import SegmentationMetric, format_iou_table
from grounding.utils import write_atomic

log = logging.getLogger(__name__)


def report_segmentation(module: L.LightningModule, metric: SegmentationMetric, class_names: list[str], name: str,
                        method: str) -> None:
    """Compute ``metric`` (a collective call under DDP: every rank calls this), log ``test/mIoU``, ``test/mAcc``,
    ``test/aAcc``, and on rank 0 write the per-class table (``name``: the file's prefix, ``method``: its title)."""
    scores = metric.compute()
    for key in ("mIoU", "mAcc", "aAcc"):
        module.log(f"test/{key}", float(scores[key]), rank_zero_only=True)
    table = format_iou_table(class_names, scores["IoU"], scores["Acc"])
    trainer = module.trainer
    log_dir = trainer.log_dir  # also a collective call under DDP
    if not trainer.is_global_zero:
        return
    log.info("%s mIoU %.4f mAcc %.4f over %d classes\n%s", method, float(scores["mIoU"]), float(scores["mAcc"]),
             len(class_names), table)
    experiment = getattr(module.logger, "experiment", None)
    if experiment is not None and hasattr(experiment, "add_text"):
        experiment.add_text("test/per_class_iou", table, 0)
    if log_dir:
        split = getattr(getattr(trainer, "datamodule", None), "evaluation_split", "test")
        path = Path(log_dir) / "predictions" / f"{name}_{split}_iou.md"
        header = f"{method} on {split}: mIoU {float(scores['mIoU']):.4f}, mAcc {float(scores['mAcc']):.4f}\n\n"
        write_atomic(path, lambda temporary: Path(temporary).write_text(header + table + "\n", encoding="utf-8"))

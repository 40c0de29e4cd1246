"""Writing ``grounding-predict``'s outputs: per image a drawn PNG and a JSON record, all of them atomically.

``ImagePredictionWriter`` is the callback of ``Trainer.predict`` over an ``ImageFolderDataModule``; it writes
into the DataModule's output folder, per image, in this order (the record last, so that a record names only
files already complete; ``grounding.data.image_folder.complete_record`` is what a resumed run checks):

- detector (``ImageGroundingModule``: ``predict_step`` returns one ``GroundingDetector`` record per image):
  ``drawn/<id>.png``, the boxes over the image (``grounding.visualize.draw_boxes``, labelled "name 0.87"),
  and ``records/<id>.json``: the detector's record (boxes x0 y0 x1 y1 in the image's pixels, scores, labels,
  width, height) plus ``image_id``, ``path`` and ``drawn``.
- segmentation (GEM, InvSeg: ``predict_step`` returns ``{"image_ids", "label_maps"}``, GEM also ``heatmaps``):
  ``labels/<id>.png`` (palette PNG, pixel value = class index) and ``labels_overlays/<id>.png`` (the map over
  the image with a legend), both by ``LabelMapWriter``; for GEM ``heatmaps/<id>/<index>.png``, each class's
  min-max scaled similarity map over the image; and ``records/<id>.json``: ``{"image_id", "path",
  "classes", "label_map", "overlay", "heatmaps": {class: path}}``, paths relative to the output folder.

At the end of the run the counts of every process are summed into ``trainer.callback_metrics``
(``predict/predicted``, ``predict/unreadable``, ``predict/skipped_existing``), which the spawning strategies
hand back to the main process too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from grounding.data.image_folder import ImageFolderDataModule, record_path
from grounding.lightning.label_writer import LabelMapWriter, _checked_id, write_rgb_png
from grounding.utils import write_json_atomic
from grounding.visualize import PRED_COLOR, draw_boxes, overlay_heatmap

log = logging.getLogger(__name__)


def write_record(out_dir: Path, record: dict) -> None:
    """``records/<id>.json``, atomically."""
    write_json_atomic(record_path(out_dir, _checked_id(record["image_id"])), record, indent=1)


class ImagePredictionWriter(Callback):
    """See the module docstring."""

    def __init__(self) -> None:
        self.out_dir: Path | None = None
        self.labels: LabelMapWriter | None = None
        self.predicted = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, ImageFolderDataModule):
            raise RuntimeError(f"ImagePredictionWriter writes predictions of an ImageFolderDataModule, not {type(datamodule).__name__}")
        self.out_dir = datamodule.resolve_out_dir()
        self.labels = LabelMapWriter(out_dir=str(self.out_dir / "labels"))
        self.labels.setup(trainer, pl_module, stage)
        self.predicted = 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        samples = {str(sample["image_id"]): sample for sample in batch}
        if isinstance(outputs, list):
            for record in outputs:
                self._write_detection(record, samples[str(record["image_id"])])
        elif isinstance(outputs, dict) and "label_maps" in outputs:
            self._write_segmentation(outputs, samples, trainer.datamodule.class_names)
        else:
            raise RuntimeError(f"{type(pl_module).__name__}.predict_step returned {type(outputs).__name__}, which "
                               "ImagePredictionWriter cannot write")

    def _write_detection(self, record: dict, sample: dict) -> None:
        image_id = _checked_id(record["image_id"])
        labels = [f"{label} {score:.2f}" for label, score in zip(record["labels"], record["scores"])]
        drawn = draw_boxes(sample["image"], torch.tensor(record["boxes"]).reshape(-1, 4), labels, PRED_COLOR)
        name = f"drawn/{image_id}.png"
        write_rgb_png(self.out_dir / name, drawn)
        write_record(self.out_dir, {**record, "drawn": name})
        self.predicted += 1

    def _write_segmentation(self, outputs: dict, samples: dict, class_names: list[str]) -> None:
        batch = list(samples.values())
        self.labels.write(outputs)
        self.labels.write_overlays(outputs, batch)
        heatmaps = outputs.get("heatmaps") or [None] * len(outputs["image_ids"])
        for image_id, maps in zip(outputs["image_ids"], heatmaps):
            name = _checked_id(image_id)
            sample = samples[str(image_id)]
            record = {"image_id": name, "path": sample["path"], "classes": list(class_names),
                      "label_map": f"labels/{name}.png", "overlay": f"labels_overlays/{name}.png"}
            if maps is not None:
                record["heatmaps"] = {}
                for class_name, index, heat in zip(maps["classes"], maps["indices"], maps["maps"]):
                    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-8)
                    path = f"heatmaps/{name}/{index}.png"
                    write_rgb_png(self.out_dir / path, overlay_heatmap(sample["image"], heat))
                    record["heatmaps"][class_name] = path
            write_record(self.out_dir, record)
            self.predicted += 1

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        counts = torch.tensor([self.predicted, len(datamodule.unreadable)], dtype=torch.float64)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts.to(pl_module.device), reduce_op="sum").cpu()
        trainer.callback_metrics["predict/predicted"] = counts[0].clone()
        trainer.callback_metrics["predict/unreadable"] = counts[1].clone()
        trainer.callback_metrics["predict/skipped_existing"] = torch.tensor(float(datamodule.skipped_existing))
        datamodule.report.log()

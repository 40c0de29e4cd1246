"""Writing ``grounding-predict``'s outputs: per image a drawn PNG and a JSON record, all of them atomically.

``ImagePredictionWriter`` is the callback of ``Trainer.predict`` over an ``ImageFolderDataModule``; it writes
into the DataModule's output folder, per image, in this order (the record last, so that a record names only
files already complete; ``grounding.data.image_folder.complete_record`` is what a resumed run checks):

- detector (``ImageGroundingModule``: ``predict_step`` returns one ``GroundingDetector`` record per image):
  ``drawn/<id>.png``, the boxes over the image (``grounding.visualize.draw_boxes``, labelled "name 0.87"),
  and ``records/<id>.json``: the detector's record (boxes x0 y0 x1 y1 in the image's pixels, scores, labels,
  width, height) plus ``image_id``, ``path`` and ``drawn``.
- segmentation (GEM, InvSeg: ``predict_step`` returns ``{"image_ids", "label_maps"}``, GEM also ``heatmaps``,
  made records by ``grounding.predictor.segmentation_records``): ``labels/<id>.png`` (palette PNG, pixel value =
  class index) and ``labels_overlays/<id>.png`` (the map over the image with a legend); for GEM
  ``heatmaps/<id>/<index>.png``, each class's min-max scaled similarity map over the image; and
  ``records/<id>.json``: ``{"image_id", "path", "classes", "label_map", "overlay", "heatmaps": {class: path}}``,
  paths relative to the output folder.
- regions (MaskInversion: ``predict_step`` returns ``MaskInversionModule.describe_regions`` records):
  ``embeddings/<id>.pt`` (``torch.load(..., weights_only=True)`` gives ``{"image_id", "region_ids",
  "embeddings": (R, P), "method"}``), ``maps/<id>/<region>.png`` (each region's LeGrad map over the image) and
  ``records/<id>.json``: ``{"image_id", "path", "method", "regions": [{"region_id", "box", "area"[, "label",
  "score"]}], "embeddings", "maps": {region: path}}``.

- images (MIMIC over a ``TargetTextDataModule``: ``predict_step`` returns per target its record with its images):
  ``images/<id>.png`` (``<id>_<k>.png`` for several samples) and ``records/<id>.json``: MIMIC's record (answers,
  scores, final losses) plus ``image_id`` and ``images`` (their paths).

The records are those of ``grounding.predictor.Predictor`` with a file's path wherever that holds a tensor.

At the end of the run the counts of every process are summed into ``trainer.callback_metrics``
(``predict/predicted``, ``predict/unreadable``, ``predict/skipped_existing``), which the spawning strategies
hand back to the main process too.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from grounding.data.image_folder import PredictionDataModule, record_path
from grounding.lightning.label_writer import _checked_id, write_label_png, write_rgb_png
from grounding.predictor import draw_record, segmentation_records
from grounding.utils import write_atomic, write_json_atomic
from grounding.visualize import labelled_overlay, overlay_heatmap

log = logging.getLogger(__name__)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the system has one, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this system
        return os.cpu_count() or 1


def default_writer_threads(processes: int = 1, cpus: int | None = None) -> int:
    """Writer threads for each of ``processes`` predicting processes of one machine: half the CPUs that fall to
    each process (the other half decodes the images and drives the model), at least 2 and at most 8.
    ``cpus``: default ``available_cpus()``."""
    cpus = available_cpus() if cpus is None else cpus
    return max(2, min(8, cpus // max(processes, 1) // 2))


class ImagePredictionWriter(Callback):
    """See the module docstring.

    threads: the images' files are drawn, encoded and written by this many background threads (PNG encoding
        releases the GIL), while the model goes on with the next batch; at most ``4 * threads`` images wait.
        0: in the loop itself. Each image's record is still written after its files, and an error in any write
        stops the run at the next batch (or at the end) with that error.
    pictures: False writes only the records and the data files (label PNGs, embeddings, MIMIC's images): no
        drawn boxes, overlays, heatmaps or region maps (a large folder at the model's speed).
    """

    def __init__(self, threads: int = 2, pictures: bool = True) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads must be an integer >= 0, got {threads!r}")
        self.threads = threads
        self.pictures = pictures
        self.out_dir: Path | None = None
        self.palette: torch.Tensor | None = None
        self.predicted = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, PredictionDataModule):
            raise RuntimeError(f"ImagePredictionWriter writes predictions of a PredictionDataModule, not {type(datamodule).__name__}")
        self.out_dir = datamodule.resolve_out_dir()
        self.palette = torch.as_tensor(datamodule.palette, dtype=torch.uint8)
        self.predicted = 0
        self._pending.clear()
        if self.threads and self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="prediction-writer")

    def _finish(self, keep: int) -> None:
        """Wait until at most ``keep`` writes are pending; the first failed write's error is raised."""
        while len(self._pending) > keep:
            self._pending.popleft().result()
            self.predicted += 1

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        samples = {str(sample["image_id"]): sample for sample in batch}
        if isinstance(outputs, dict) and "label_maps" in outputs:
            outputs = segmentation_records(outputs, batch, trainer.datamodule.class_names)
        if not isinstance(outputs, list):
            raise RuntimeError(f"{type(pl_module).__name__}.predict_step returned {type(outputs).__name__}, which "
                               "ImagePredictionWriter cannot write")
        for record in outputs:
            sample = samples[str(record["image_id"])]
            if isinstance(sample.get("image"), torch.Tensor):  # the device's batch: the writers draw on the CPU
                sample = {**sample, "image": sample["image"].cpu()}
            if self._pool is None:
                self.write(record, sample)
                self.predicted += 1
            else:
                self._pending.append(self._pool.submit(self.write, record, sample))
        self._finish(4 * self.threads)

    def write(self, record: dict, sample: dict) -> None:
        """The files of one in-memory record, then its JSON record (naming them)."""
        name = _checked_id(record["image_id"])
        image = sample.get("image")
        if "boxes" in record:
            if self.pictures:
                record = {**record, "drawn": f"drawn/{name}.png"}
                write_rgb_png(self.out_dir / record["drawn"], draw_record(record, image))
        elif "label_map" in record:
            labels = record["label_map"]
            files = {"label_map": f"labels/{name}.png"}
            write_label_png(self.out_dir / files["label_map"], labels, self.palette)
            record = {key: value for key, value in record.items() if self.pictures or key != "heatmaps"}
            if self.pictures:
                files["overlay"] = f"labels_overlays/{name}.png"
                write_rgb_png(self.out_dir / files["overlay"], labelled_overlay(image, labels, record["classes"], self.palette))
            if "heatmaps" in record:
                index = {class_name: i for i, class_name in enumerate(record["classes"])}
                files["heatmaps"] = {}
                for class_name, heat in record["heatmaps"].items():
                    path = f"heatmaps/{name}/{index[class_name]}.png"
                    write_rgb_png(self.out_dir / path, overlay_heatmap(image, heat))
                    files["heatmaps"][class_name] = path
            record = {**record, **files}
        elif "regions" in record:
            region_ids = [region["region_id"] for region in record["regions"]]
            payload = {"image_id": name, "region_ids": region_ids, "embeddings": record["embeddings"], "method": record["method"]}
            files = {"embeddings": f"embeddings/{name}.pt", "maps": {}}
            write_atomic(self.out_dir / files["embeddings"], lambda temporary: torch.save(payload, temporary))
            maps = record["maps"] if record["maps"] is not None and self.pictures else []
            for region, heat in zip(region_ids, maps):
                path = f"maps/{name}/{_checked_id(region)}.png"
                write_rgb_png(self.out_dir / path, overlay_heatmap(image, heat))
                files["maps"][region] = path
            record = {**record, **files}
        elif "images" in record:
            images = record["images"]
            paths = [f"images/{name}.png"] if len(images) == 1 else [f"images/{name}_{k}.png" for k in range(len(images))]
            for path, picture in zip(paths, images):
                write_rgb_png(self.out_dir / path, picture)
            record = {**record, "images": paths}
        else:
            raise RuntimeError(f"ImagePredictionWriter cannot write a record with keys {sorted(record)}")
        write_json_atomic(record_path(self.out_dir, name), record, indent=1)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """The pool is shut down whatever happened (an interrupted run waits for the writes under way)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(0)
        datamodule = trainer.datamodule
        counts = torch.tensor([self.predicted, len(datamodule.unreadable)], dtype=torch.float64)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts.to(pl_module.device), reduce_op="sum").cpu()
        trainer.callback_metrics["predict/predicted"] = counts[0].clone()
        trainer.callback_metrics["predict/unreadable"] = counts[1].clone()
        trainer.callback_metrics["predict/skipped_existing"] = torch.tensor(float(datamodule.skipped_existing))
        datamodule.report.log()

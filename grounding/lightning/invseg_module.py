"""InvSeg under the Trainer: test-time inversion of Stable Diffusion prompt embeddings for semantic segmentation
(docs/invseg.md).

For every test image (``test_step`` / ``predict_step``; no training) the module picks the image's categories
(the dataset's list, the ground truth's "oracle" set, those a category filter finds, those a file lists for the
image, or a list of names; the dataset's background class always among them) and runs
``grounding.models.invseg_inversion.InvSeg`` on it: the class tokens of one prompt adapted by ``inversion.steps``
Adam steps on the InvSeg loss, then the arg-max of the adapted class maps at the image's own size.
``method: diffsegmenter`` is the baseline on the same capture.

Scores: mIoU, mAcc, pixel accuracy from an exact confusion matrix that counts every image once across
processes (``grounding.metrics.segmentation``); a per-class IoU table in the log, in TensorBoard and in
``<run>/predictions/invseg_<split>_iou.md``. ``test_step`` returns the predicted label maps so that
``grounding.lightning.label_writer.LabelMapWriter`` writes them as palette PNGs. Every random draw of an
image (crops, timesteps, noise) comes from a generator seeded by (``seed``, image id), so the result of
an image does not depend on the process it ran on or on the images before it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Sequence

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from grounding.constants import IGNORE_INDEX
from grounding.data.category_lists import CategoryFile, CategoryLists
from grounding.data.segmentation import SegmentationDataset
from grounding.data.segmentation_readers import SegmentationRecord
from grounding.lightning.segmentation_report import report_segmentation
from grounding.lightning.test_time import DtypeName, TestTimeModule, torch_dtype
from grounding.metrics.segmentation import SegmentationMetric
from grounding.models.category_filter import CaptionClipFilter
from grounding.models.invseg_inversion import BaselineSettings, InversionSettings, InvSeg, Method
from grounding.models.stable_diffusion import StableDiffusion, build_stable_diffusion
from grounding.visualize import labelled_overlay, overlay_heatmap, panel_grid, segmentation_panels

log = logging.getLogger(__name__)


class InvSegModule(TestTimeModule):
    """InvSeg (and the DiffSegmenter baseline) as a test-time LightningModule over ``SegmentationDataModule``.

    Args:
        model: ``"tiny"`` (random, offline; for tests and the synthetic demo) or a Stable Diffusion 2.x hub id
            / local folder in diffusers' layout (``stabilityai/stable-diffusion-2-1-base``).
        model_dtype: weights of the frozen model: float32, bfloat16 or float16 (the attention probabilities
            and the losses are computed in float32 either way).
        method: ``invseg`` or ``diffsegmenter``.
        categories: ``all`` (the dataset's classes), ``oracle`` (the classes present in the image's ground
            truth, the paper's ablation), ``filter`` (those ``category_filter`` finds in the image, the
            paper's setting), a ``CategoryFile`` (``{path, sections, aliases}``: the classes a JSON file lists
            for each image, e.g. DiffSegmenter's and iSeg's published predictions; read and checked at setup,
            every image of the split must be in it), or a list of class names of the dataset. The dataset's
            background class (when it has one) is always added; a dataset without one (ADE20K, Context-59)
            assigns every pixel to a class.
        image_size: the image is resized to image_size × image_size for the model (512 for SD 2.1-base); the
            prediction is upsampled back to the image's own size.
        resolution: side of the attention grid InvSeg captures (16: the 16 × 16 layers of a 512-px input).
        inversion: the adaptation (``InversionSettings``: steps, lr, views, min_scale, t_min, t_max,
            t_inference, alpha, sharpness, distance_grad).
        baseline: DiffSegmenter's timestep and resolution weights (``BaselineSettings``: t, weights).
        log_images: TensorBoard panels (image | ground truth | prediction | maps before | after) of this many
            images per run (rank 0).
        seed: with the image id, seeds every random draw of that image.
        category_filter: for ``categories: filter``: a callable (image (3, H, W) uint8, names) -> indices of
            the names present, e.g. ``grounding.models.category_filter.CaptionClipFilter`` (BLIP + CLIP).
    """

    def __init__(
        self,
        model: str = "tiny",
        model_dtype: DtypeName = "float32",
        method: Method = "invseg",
        categories: Literal["all", "oracle", "filter"] | list[str] | CategoryFile = "all",
        image_size: PositiveInt = 512,
        resolution: PositiveInt = 16,
        inversion: InversionSettings = InversionSettings(),
        baseline: BaselineSettings = BaselineSettings(),
        log_images: NonNegativeInt = 4,
        seed: int = 0,
        category_filter: CaptionClipFilter | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["category_filter"])
        if categories == "filter" and category_filter is None:
            raise ValueError("model.categories 'filter' needs model.category_filter (e.g. class_path "
                             "grounding.models.category_filter.CaptionClipFilter)")
        if isinstance(categories, list) and not categories:
            raise ValueError("model.categories is an empty list; give class names of the dataset, 'all' or 'oracle'")
        self.category_filter = category_filter
        self.diffusion: StableDiffusion = build_stable_diffusion(model, dtype=torch_dtype(model_dtype))
        try:
            self.invseg = InvSeg(self.diffusion, method, image_size, resolution, inversion, baseline)
        except ValueError as error:
            raise ValueError(f"model.{error}") from None
        self.class_names: list[str] = []
        self.background: int | None = None
        self.category_lists: CategoryLists | None = None  # categories given as a CategoryFile, read at setup
        self.metric: SegmentationMetric | None = None

    # ------------------------------------------------------------------------------------- set-up
    def classes_from(self, datamodule) -> None:
        self.set_classes(datamodule.class_names, datamodule.background_index, datamodule.ignore_index)
        if self.category_lists is not None and isinstance(datamodule.dataset, SegmentationDataset):
            self.check_listed(datamodule.dataset.records)  # now, not when the run reaches the image

    def set_classes(self, class_names: Sequence[str], background_index: int | None = 0, ignore_index: int = IGNORE_INDEX) -> None:
        """The dataset's classes (index = label value) and its background class (or None)."""
        self.class_names = list(class_names)
        self.background = background_index
        requested = self.hparams.categories
        if isinstance(requested, list):
            unknown = [name for name in requested if name not in self.class_names]
            if unknown:
                raise ValueError(f"model.categories names {unknown} that are not classes of the dataset: {self.class_names}")
        if isinstance(requested, CategoryFile):
            try:
                self.category_lists = CategoryLists(requested, self.class_names)
            except ValueError as error:
                raise ValueError(f"model.categories: {error}") from None
        self.metric = SegmentationMetric(len(self.class_names), ignore_index).to(self.device)

    def categories_of(self, sample: dict) -> list[int]:
        """Label values of the categories in this image's prompt (background first when the dataset has one)."""
        requested = self.hparams.categories
        if requested == "all":
            values = list(range(len(self.class_names)))
        elif requested == "oracle":
            values = list(sample["present"])
        elif requested == "filter":
            candidates = [v for v in range(len(self.class_names)) if v != self.background]
            kept = self.category_filter(sample["image"], [self.class_names[v] for v in candidates])
            values = [candidates[i] for i in kept]
        elif isinstance(requested, CategoryFile):
            values = self.listed_categories(sample["image_id"], sample.get("path"))
        else:
            values = [self.class_names.index(name) for name in requested]
        if self.background is not None:
            values = [self.background] + [v for v in values if v != self.background]
        if not values:
            raise ValueError(f"image {sample['image_id']}: no category to segment (model.categories={requested!r})")
        return values

    def listed_categories(self, image_id: str, path: str | Path | None = None) -> list[int]:
        """The label values that ``model.categories``'s file lists for one image, looked up by the image's own id
        (or file name), so the same on any process. An image the file does not list is an error, and so is an
        empty list when the dataset has no background class to give the image to."""
        if self.category_lists is None:
            raise RuntimeError("InvSegModule reads model.categories's file with the dataset's classes: run it with a "
                               "SegmentationDataModule or call set_classes")
        where = f"model.categories: category file {self.category_lists.path}"
        try:
            values = self.category_lists.find(image_id, path)
        except ValueError as error:
            raise ValueError(f"model.categories: {error}") from None
        if values is None:
            raise ValueError(f"{where} lists no categories for image {image_id}" + (f" ({path})" if path else "")
                             + "; an image is named by its id, its file name or its path")
        if not values and self.background is None:
            raise ValueError(f"{where} lists no class for image {image_id}, and the dataset has no background class")
        return values

    def check_listed(self, records: Sequence[SegmentationRecord]) -> None:
        """``listed_categories`` of every record's image: the first one that fails is the error."""
        for record in records:
            self.listed_categories(record.image_id, record.path)

    # ------------------------------------------------------------------------------------- the method
    def segment(self, sample: dict) -> dict:
        """Label map (H, W) of one sample (its own size), with the maps before / after for pictures."""
        values = self.categories_of(sample)
        names = [self.class_names[v] for v in values]
        try:
            result = self.invseg(sample["image"].to(self.device), names, self.sample_generator(sample["image_id"]))
        except ValueError as error:
            raise ValueError(f"image {sample['image_id']}: {error} (model.categories={self.hparams.categories!r})") from None
        labels = torch.tensor(values, device=result.index.device)[result.index]
        return {"labels": labels, "names": names, "before": result.before, "after": result.after, "losses": result.losses}

    # ------------------------------------------------------------------------------------- loops
    def process(self, batch: list[dict], score: bool) -> dict:
        ids, label_maps = [], []
        for sample in batch:
            result = self.segment(sample)
            if score:
                if self.metric is None:
                    raise RuntimeError("InvSegModule needs the dataset's classes: run it with a SegmentationDataModule or call set_classes")
                self.metric.update(result["labels"], sample["labels"].to(result["labels"].device))
            if result["losses"] and score:  # Trainer.predict takes no self.log
                self.log("test/loss_first", result["losses"][0], batch_size=1)
                self.log("test/loss_last", result["losses"][-1], batch_size=1)
            self._log_panels(sample, result)
            ids.append(sample["image_id"])
            label_maps.append(result["labels"].cpu())
        return {"image_ids": ids, "label_maps": label_maps}

    def on_test_epoch_end(self) -> None:
        report_segmentation(self, self.metric, self.class_names, "invseg", self.hparams.method)

    # ------------------------------------------------------------------------------------- pictures
    def _log_panels(self, sample: dict, result: dict) -> None:
        """A grid: image | ground truth | prediction | prediction over the image with its legend, then each
        category's map before and after the inversion, two categories to a row."""
        experiment = self.picture_logger()
        if experiment is None or "labels" not in sample:  # no ground truth: a user's image
            return
        panels = segmentation_panels(sample["image"].cpu(), sample["labels"], result["labels"])
        image, titles = panels[0], ["image", "ground truth", "prediction", "prediction over the image"]
        panels.append(labelled_overlay(sample["image"].cpu(), result["labels"].cpu(), self.class_names))
        for c, name in enumerate(result["names"]):
            panels += [overlay_heatmap(image, result["before"][c]), overlay_heatmap(image, result["after"][c])]
            titles += [f"{name}: before"[:30], f"{name}: after"[:30]]
        experiment.add_image(f"invseg/{sample['image_id']}", panel_grid(panels, titles, columns=4), self._logged)
        self._logged += 1

"""GEM (and the training-free baselines) as evaluation LightningModules (docs/gem.md).

``GEMSegmentationModule`` over ``grounding.data.segmentation.SegmentationDataModule``: zero-shot semantic
segmentation, scored by mIoU / mAcc, label maps returned for ``LabelMapWriter``. ``GEMPointModule`` over
``grounding.data.openimages_points.OpenImagesPointsDataModule``: zero-shot point prediction, scored by p-mIoU.
Both compute the text embeddings of the dataset's classes once and take each image's class maps from
``grounding.models.gem.DenseSimilarity`` (``method``: gem, plain, maskclip, clipsurgery; the image resized to
its ``short_side``, whole or in sliding windows, the maps at the image's own size). Nothing is trained; images
are split across processes and counted once.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from grounding.constants import IGNORE_INDEX
from grounding.lightning.segmentation_report import report_segmentation
from grounding.lightning.test_time import TestTimeModule
from grounding.metrics.point_miou import PointMIoU
from grounding.metrics.segmentation import SegmentationMetric
from grounding.models.clip import build_clip
from grounding.models.gem import DenseSimilarity, labels_with_background
from grounding.visualize import labelled_overlay, overlay_heatmap, panel_grid, segmentation_panels, upscale

log = logging.getLogger(__name__)

Method = Literal["gem", "plain", "maskclip", "clipsurgery"]


class _GEMBase(TestTimeModule):
    """The shared part: the frozen CLIP backbone, ``DenseSimilarity`` over it, the class text embeddings."""

    def __init__(self, backbone: str, method: str, depth: int, iterations: int, temperature: float | None,
                 template: str, short_side: int, window: int | None, stride: int | None) -> None:
        super().__init__()
        # the backbone's own image_size only sets its preprocess(), which is not used here (DenseSimilarity resizes)
        self.backbone = build_clip(backbone, image_size=448)
        self.backbone.requires_grad_(False).eval()
        try:
            self.dense = DenseSimilarity(self.backbone, method, depth=depth, iterations=iterations,
                                         temperature=temperature, short_side=short_side, window=window,
                                         stride=stride, template=template)
        except ValueError as error:
            raise ValueError(f"model.{error}") from None
        self.class_names: list[str] = []
        self._text: torch.Tensor | None = None

    def train(self, mode: bool = True):
        """Stays in eval mode: nothing here is trained."""
        return super().train(False)

    def set_text(self, names: list[str]) -> None:
        """The class text embeddings (C, P), computed once per dataset."""
        if not names:
            raise ValueError("GEM needs at least one class name")
        with torch.no_grad():
            self._text = self.dense.text(names).to(self.device)

    def class_maps(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(C, H, W) cosine similarities of ``text`` (C, P) at every pixel of ``image`` uint8 (3, H, W)."""
        return self.dense(image, text)

    def _log_panel(self, tag: str, panels: list[torch.Tensor], titles: list[str]) -> None:
        experiment = self.picture_logger()
        if experiment is not None:
            experiment.add_image(tag, panel_grid(panels, titles, columns=4), self._logged)
            self._logged += 1


class GEMSegmentationModule(_GEMBase):
    """Zero-shot semantic segmentation with GEM or a baseline (docs/gem.md, G-4).

    Args:
        backbone: ``"tiny"`` (random, offline: tests and the synthetic demo) or a CLIP checkpoint
            (``openai/clip-vit-base-patch16``, OpenCLIP / MetaCLIP in transformers' format), hub id or folder.
        method: gem | plain | maskclip | clipsurgery.
        depth, iterations, temperature: GEM's settings (the last depth − 1 blocks; self-self iterations;
            None = the adaptive temperature).
        template: the sentence a class name is put in.
        short_side: each image is resized to this shorter side (448).
        window, stride: sliding-window inference over the resized image (None: the whole image at once).
        background_threshold: on data with a background class, a pixel is background when its largest
            softmax-normalized similarity (softmax over the foreground classes of ``logit_scale`` × cosine) is
            below this (0.85); only the foreground classes are prompted.
        logit_scale: the scale of that softmax (100, CLIP's).
        log_images: TensorBoard panels (image | ground truth | prediction | the maps of the classes present).
    """

    def __init__(
        self,
        backbone: str = "tiny",
        method: Method = "gem",
        depth: PositiveInt = 7,
        iterations: NonNegativeInt = 1,
        temperature: PositiveFloat | None = None,
        template: str = "a photo of a {}.",
        short_side: PositiveInt = 448,
        window: PositiveInt | None = None,
        stride: PositiveInt | None = None,
        background_threshold: float = 0.85,
        logit_scale: PositiveFloat = 100.0,
        log_images: NonNegativeInt = 4,
    ):
        super().__init__(backbone, method, depth, iterations, temperature, template, short_side, window, stride)
        self.save_hyperparameters()
        if not 0 <= background_threshold <= 1:
            raise ValueError(f"model.background_threshold must be in [0, 1], got {background_threshold!r}")
        self.background: int | None = None
        self.foreground: list[int] = []
        self.metric: SegmentationMetric | None = None

    def classes_from(self, datamodule) -> None:
        self.set_classes(datamodule.class_names, datamodule.background_index, datamodule.ignore_index)

    def set_classes(self, class_names: list[str], background_index: int | None = None, ignore_index: int = IGNORE_INDEX) -> None:
        """The dataset's classes (index = label value); the background class, when there is one, is not prompted."""
        self.class_names = list(class_names)
        self.background = background_index
        self.foreground = [c for c in range(len(class_names)) if c != background_index]
        self.set_text([self.class_names[c] for c in self.foreground])
        self.metric = SegmentationMetric(len(self.class_names), ignore_index).to(self.device)

    def predict_labels(self, maps: torch.Tensor) -> torch.Tensor:
        """(C_fg, H, W) cosine maps of the foreground classes -> (H, W) label values of the dataset."""
        h = self.hparams
        return labels_with_background(maps, self.foreground, self.background, h.background_threshold, h.logit_scale)

    def process(self, batch: list[dict], score: bool) -> dict:
        if self._text is None:
            raise RuntimeError("GEMSegmentationModule needs the dataset's classes: run it with a SegmentationDataModule or call set_classes")
        ids, label_maps, heatmaps = [], [], []
        for sample in batch:
            maps = self.class_maps(sample["image"], self._text)
            labels = self.predict_labels(maps)
            if score:
                self.metric.update(labels, sample["labels"].to(labels.device))
            else:  # predict: each prompted class's map too (grounding-predict draws them)
                heatmaps.append({"classes": [self.class_names[c] for c in self.foreground],
                                 "indices": list(self.foreground), "maps": maps.cpu()})
            self._picture(sample, maps, labels)
            ids.append(sample["image_id"])
            label_maps.append(labels.cpu())
        if score:
            return {"image_ids": ids, "label_maps": label_maps}
        return {"image_ids": ids, "label_maps": label_maps, "heatmaps": heatmaps}

    def on_test_epoch_end(self) -> None:
        report_segmentation(self, self.metric, self.class_names, "gem", self.hparams.method)

    def _picture(self, sample: dict, maps: torch.Tensor, labels: torch.Tensor) -> None:
        if self.picture_logger() is None or "labels" not in sample:  # no ground truth: a user's image
            return
        panels = segmentation_panels(sample["image"].cpu(), sample["labels"], labels)
        panels.append(labelled_overlay(sample["image"].cpu(), labels.cpu(), self.class_names))
        image, titles = panels[0], ["image", "ground truth", "prediction", "prediction over the image"]
        for c in [c for c in sample.get("present", []) if c in self.foreground][:4]:
            heat = maps[self.foreground.index(c)]
            heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-8)
            panels.append(overlay_heatmap(image, heat))
            titles.append(self.class_names[c][:30])
        self._log_panel(f"gem/{sample['image_id']}", panels, titles)


class GEMPointModule(_GEMBase):
    """Zero-shot point prediction on OpenImages V7 point labels, scored by p-mIoU (docs/gem.md, G-5).

    Args: as ``GEMSegmentationModule`` (no background rule), plus ``threshold`` (0.5) on the min-max scaled maps.
    The text embeddings of all the dataset's classes are computed once; each image prompts the classes it has
    points for.
    """

    def __init__(
        self,
        backbone: str = "tiny",
        method: Method = "gem",
        depth: PositiveInt = 7,
        iterations: NonNegativeInt = 1,
        temperature: PositiveFloat | None = None,
        template: str = "a photo of a {}.",
        short_side: PositiveInt = 448,
        window: PositiveInt | None = None,
        stride: PositiveInt | None = None,
        threshold: float = 0.5,
        log_images: NonNegativeInt = 4,
    ):
        super().__init__(backbone, method, depth, iterations, temperature, template, short_side, window, stride)
        self.save_hyperparameters()
        if not 0 < threshold < 1:
            raise ValueError(f"model.threshold must be in (0, 1), got {threshold!r}")
        self.metric: PointMIoU | None = None

    def classes_from(self, datamodule) -> None:
        self.set_classes(datamodule.class_names)

    def set_classes(self, class_names: list[str]) -> None:
        self.class_names = list(class_names)
        self.set_text(self.class_names)
        self.metric = PointMIoU(len(self.class_names), threshold=self.hparams.threshold).to(self.device)

    def process(self, batch: list[dict], score: bool) -> dict:
        if self._text is None:
            raise RuntimeError("GEMPointModule needs the dataset's classes: run it with an OpenImagesPointsDataModule or call set_classes")
        ids, heatmaps = [], []
        for sample in batch:
            classes = list(sample["classes"])
            if not classes:
                continue
            maps = self.class_maps(sample["image"], self._text[torch.tensor(classes, device=self._text.device)])
            if score:
                self.metric.update(maps, classes, sample["points"], sample["point_classes"], sample["point_labels"])
            if self.picture_logger() is not None:
                image, _ = upscale(sample["image"].cpu())
                panels = [image] + [overlay_heatmap(image, (m - m.min()) / (m.max() - m.min()).clamp_min(1e-8)) for m in maps[:4]]
                self._log_panel(f"gem_points/{sample['image_id']}", panels,
                                ["image"] + [self.class_names[c][:30] for c in classes[:4]])
            ids.append(sample["image_id"])
            heatmaps.append({"classes": classes, "maps": maps.cpu()})
        return {"image_ids": ids, "heatmaps": heatmaps}

    def on_test_epoch_end(self) -> None:
        scores = self.metric.compute()
        self.log("test/p_mIoU", float(scores["p-mIoU"]), rank_zero_only=True)

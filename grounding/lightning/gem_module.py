"""GEM (and the training-free baselines) as evaluation LightningModules (docs/gem.md).

``GEMSegmentationModule`` over ``grounding.data.segmentation.SegmentationDataModule``: zero-shot semantic
segmentation, scored by mIoU / mAcc, label maps returned for ``LabelMapWriter``. ``GEMPointModule`` over
``grounding.data.openimages_points.OpenImagesPointsDataModule``: zero-shot point prediction, scored by p-mIoU.
Both compute the text embeddings of the dataset's classes once, resize each image so that its shorter side is
``short_side`` (the longer side rounded to a multiple of the patch size), and take the class maps of
``grounding.models.gem.similarity_maps`` (``method``: gem, plain, maskclip, clipsurgery), upsampled to the
image's own size. Nothing is trained; images are split across processes and counted once.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
import torch.nn.functional as F

from grounding.metrics.point_miou import PointMIoU
from grounding.lightning.segmentation_report import report_segmentation
from grounding.metrics.segmentation import SegmentationMetric
from grounding.models.clip import build_clip
from grounding.models.gem import GEM, class_text_embeddings, similarity_maps
from grounding.visualize import overlay_heatmap, panel_row, segmentation_panels, upscale

log = logging.getLogger(__name__)

METHODS = ("gem", "plain", "maskclip", "clipsurgery")


class _GEMBase(L.LightningModule):
    """The shared part: the frozen CLIP backbone, the class text embeddings, the maps of one image."""

    def __init__(self, backbone: str, method: str, depth: int, iterations: int, temperature: float | None,
                 template: str, short_side: int, window: int | None, stride: int | None, log_images: int) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"model.method must be one of {', '.join(METHODS)}, got {method!r}")
        if "{}" not in template:
            raise ValueError(f"model.template must hold '{{}}' where the class name goes, got {template!r}")
        # the backbone's own image_size only sets its preprocess(), which is not used here (see ``resized``)
        self.backbone = build_clip(backbone, image_size=448)
        self.backbone.requires_grad_(False).eval()
        GEM(self.backbone, method, depth=depth, iterations=iterations, temperature=temperature)  # checks the settings now
        patch = self.backbone.patch_size
        if short_side < patch or short_side % patch:
            raise ValueError(f"model.short_side {short_side} must be a positive multiple of the patch size {patch}")
        if (window is None) != (stride is None):
            raise ValueError("model.window and model.stride are set together (sliding-window inference) or not at all")
        if window is not None and (window % patch or window < patch or not 0 < stride <= window or stride % patch):
            raise ValueError(f"model.window ({window}) and model.stride ({stride}) must be multiples of the patch size "
                             f"{patch} with 0 < stride <= window")
        self.class_names: list[str] = []
        self.metric = None  # the subclass's metric, made when the dataset's classes are known
        self._text: torch.Tensor | None = None
        self._logged = 0

    def train(self, mode: bool = True):
        """Stays in eval mode: nothing here is trained."""
        return super().train(False)

    def set_text(self, names: list[str]) -> None:
        """The class text embeddings (C, P), computed once per dataset."""
        if not names:
            raise ValueError("GEM needs at least one class name")
        with torch.no_grad():
            self._text = class_text_embeddings(self.backbone, names, self.hparams.template).to(self.device)

    def resized(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) -> normalized (1, 3, h, w) with min(h, w) = short_side, both multiples of the patch size."""
        patch, short = self.backbone.patch_size, self.hparams.short_side
        height, width = image.shape[-2:]
        scale = short / min(height, width)
        size = [max(patch, round(height * scale / patch) * patch), max(patch, round(width * scale / patch) * patch)]
        pixels = F.interpolate(image[None].float().to(self.device) / 255, size=size, mode="bicubic",
                               align_corners=False, antialias=True).clamp(0, 1)
        return (pixels - self.backbone.mean) / self.backbone.std

    def _settings(self) -> dict:
        h = self.hparams
        return {"depth": h.depth, "iterations": h.iterations, "temperature": h.temperature}

    @torch.no_grad()
    def class_maps(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(C, H, W) cosine similarities of ``text`` (C, P) at every pixel of ``image`` uint8 (3, H, W)."""
        h = self.hparams
        pixels = self.resized(image)
        if h.window is None:
            maps = similarity_maps(self.backbone, pixels, text, h.method, **self._settings())[0]
        else:
            maps = self._sliding(pixels, text)
        return F.interpolate(maps[None], size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)[0]

    def _sliding(self, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Windows of ``window`` px every ``stride`` px (the last one flush with the border), maps averaged where
        they overlap (docs/gem.md)."""
        h = self.hparams
        height, width = pixels.shape[-2:]

        def starts(size: int) -> list[int]:
            if size <= h.window:
                return [0]
            positions = list(range(0, size - h.window + 1, h.stride))
            return positions if positions[-1] == size - h.window else positions + [size - h.window]

        total = pixels.new_zeros(text.shape[0], height, width)
        count = pixels.new_zeros(1, height, width)
        for top in starts(height):
            for left in starts(width):
                crop = pixels[..., top:top + h.window, left:left + h.window]
                maps = similarity_maps(self.backbone, crop, text, h.method, **self._settings())[0]
                total[:, top:top + crop.shape[-2], left:left + crop.shape[-1]] += maps
                count[:, top:top + crop.shape[-2], left:left + crop.shape[-1]] += 1
        return total / count

    def on_test_epoch_start(self) -> None:
        self._logged = 0
        if self.metric is not None:
            self.metric.reset()

    on_predict_epoch_start = on_test_epoch_start

    def _log_panel(self, tag: str, panels: list[torch.Tensor], titles: list[str]) -> None:
        if self._logged >= self.hparams.log_images or self._trainer is None or not self.trainer.is_global_zero:
            return
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        experiment.add_image(tag, panel_row(panels, titles), self._logged)
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
        method: str = "gem",
        depth: int = 7,
        iterations: int = 1,
        temperature: float | None = None,
        template: str = "a photo of a {}.",
        short_side: int = 448,
        window: int | None = None,
        stride: int | None = None,
        background_threshold: float = 0.85,
        logit_scale: float = 100.0,
        log_images: int = 4,
    ):
        self.save_hyperparameters()
        super().__init__(backbone, method, depth, iterations, temperature, template, short_side, window, stride, log_images)
        if not 0 <= background_threshold <= 1:
            raise ValueError(f"model.background_threshold must be in [0, 1], got {background_threshold!r}")
        self.background: int | None = None
        self.foreground: list[int] = []
        self.metric: SegmentationMetric | None = None

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.set_classes(datamodule.class_names, datamodule.background_index, datamodule.ignore_index)

    def set_classes(self, class_names: list[str], background_index: int | None = None, ignore_index: int = 255) -> None:
        """The dataset's classes (index = label value); the background class, when there is one, is not prompted."""
        self.class_names = list(class_names)
        self.background = background_index
        self.foreground = [c for c in range(len(class_names)) if c != background_index]
        self.set_text([self.class_names[c] for c in self.foreground])
        self.metric = SegmentationMetric(len(self.class_names), ignore_index).to(self.device)

    def predict_labels(self, maps: torch.Tensor) -> torch.Tensor:
        """(C_fg, H, W) cosine maps of the foreground classes -> (H, W) label values of the dataset."""
        index = maps.argmax(0)
        labels = torch.tensor(self.foreground, device=maps.device)[index]
        if self.background is not None:
            confidence = (self.hparams.logit_scale * maps).softmax(0).amax(0)
            labels = torch.where(confidence < self.hparams.background_threshold, torch.full_like(labels, self.background), labels)
        return labels

    def _process(self, batch: list[dict], score: bool) -> dict:
        if self._text is None:
            raise RuntimeError("GEMSegmentationModule needs the dataset's classes: run it with a SegmentationDataModule or call set_classes")
        ids, label_maps = [], []
        for sample in batch:
            maps = self.class_maps(sample["image"], self._text)
            labels = self.predict_labels(maps)
            if score:
                self.metric.update(labels, sample["labels"].to(labels.device), [sample["image_id"]])
            self._picture(sample, maps, labels)
            ids.append(sample["image_id"])
            label_maps.append(labels.cpu())
        return {"image_ids": ids, "label_maps": label_maps}

    def test_step(self, batch: list[dict], batch_idx: int) -> dict:
        return self._process(batch, score=True)

    def predict_step(self, batch: list[dict], batch_idx: int) -> dict:
        return self._process(batch, score=False)

    def on_test_epoch_end(self) -> None:
        report_segmentation(self, self.metric, self.class_names, "gem", self.hparams.method)

    def _picture(self, sample: dict, maps: torch.Tensor, labels: torch.Tensor) -> None:
        if self._logged >= self.hparams.log_images:
            return
        panels = segmentation_panels(sample["image"].cpu(), sample["labels"], labels)
        image, titles = panels[0], ["image", "ground truth", "prediction"]
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
        method: str = "gem",
        depth: int = 7,
        iterations: int = 1,
        temperature: float | None = None,
        template: str = "a photo of a {}.",
        short_side: int = 448,
        window: int | None = None,
        stride: int | None = None,
        threshold: float = 0.5,
        log_images: int = 4,
    ):
        self.save_hyperparameters()
        super().__init__(backbone, method, depth, iterations, temperature, template, short_side, window, stride, log_images)
        if not 0 < threshold < 1:
            raise ValueError(f"model.threshold must be in (0, 1), got {threshold!r}")
        self.metric: PointMIoU | None = None

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.set_classes(datamodule.class_names)

    def set_classes(self, class_names: list[str]) -> None:
        self.class_names = list(class_names)
        self.set_text(self.class_names)
        self.metric = PointMIoU(len(self.class_names), threshold=self.hparams.threshold).to(self.device)

    def test_step(self, batch: list[dict], batch_idx: int) -> None:
        if self._text is None:
            raise RuntimeError("GEMPointModule needs the dataset's classes: run it with an OpenImagesPointsDataModule or call set_classes")
        for sample in batch:
            classes = list(sample["classes"])
            if not classes:
                continue
            maps = self.class_maps(sample["image"], self._text[torch.tensor(classes, device=self._text.device)])
            self.metric.update(maps, classes, sample["points"], sample["point_classes"], sample["point_labels"], sample["image_id"])
            if self._logged < self.hparams.log_images:
                image, _ = upscale(sample["image"].cpu())
                panels = [image] + [overlay_heatmap(image, (m - m.min()) / (m.max() - m.min()).clamp_min(1e-8)) for m in maps[:4]]
                self._log_panel(f"gem_points/{sample['image_id']}", panels,
                                ["image"] + [self.class_names[c][:30] for c in classes[:4]])

    def on_test_epoch_end(self) -> None:
        scores = self.metric.compute()
        self.log("test/p_mIoU", float(scores["p-mIoU"]), rank_zero_only=True)

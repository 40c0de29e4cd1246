"""GEM (and the training-free baselines) as evaluation LightningModules (docs/gem.md).

``GEMSegmentationModule`` over ``grounding.data.segmentation.SegmentationDataModule``: zero-shot semantic
segmentation, scored by mIoU / mAcc, label maps returned for ``LabelMapWriter``. ``GEMPointModule`` over
``grounding.data.openimages_points.OpenImagesPointsDataModule``: zero-shot point prediction, scored by p-mIoU.
Both compute the text embeddings of the dataset's classes once and take each image's class maps from
``grounding.models.gem.DenseSimilarity`` (``method``: gem or a baseline of ``grounding.models.gem.METHODS``;
the image resized to its ``short_side``, whole or in sliding windows, the maps at the image's own size, PAMR
optionally). Nothing is trained; images are split across processes and counted once.

``GEMSegmentationModule``'s ``preset`` (``PRESETS``) sets the protocol in one word: ``gem``, GEM's own (shorter
side 448, the whole image, "a photo of a {}.", background where the foreground softmax is unsure) or ``sclip``,
the training-free protocol SCLIP introduced and its successors share (shorter side 336, 224 px windows at stride
112, CLIP's 80 ImageNet templates, background prompted like any class and set where the largest class
probability is below a threshold). Every setting a preset sets can still be given on its own, and then wins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Literal, Sequence

import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from grounding.constants import IGNORE_INDEX
from grounding.lightning.segmentation_report import report_segmentation
from grounding.lightning.test_time import TestTimeModule
from grounding.metrics.point_miou import PointMIoU
from grounding.metrics.segmentation import SegmentationMetric
from grounding.models.clip import build_clip
from grounding.models.gem import (
    DenseSimilarity,
    class_probabilities,
    labels_from_probabilities,
    labels_with_background,
    max_over_synonyms,
    synonym_classes,
)
from grounding.models.templates import GEM_TEMPLATE, IMAGENET_TEMPLATES, checked_templates
from grounding.visualize import labelled_overlay, overlay_heatmap, panel_grid, segmentation_panels, upscale

log = logging.getLogger(__name__)

Method = Literal["gem", "plain", "maskclip", "clipsurgery", "sclip", "clearclip", "naclip"]
Preset = Literal["gem", "sclip"]
#: unprompted: only the foreground classes are prompted, background where their softmax is unsure (GEM);
#: prompted: the background class is prompted like any other (with its synonyms), background where the largest
#: class probability is below the threshold (SCLIP's protocol); see docs/gem.md
BackgroundRule = Literal["unprompted", "prompted"]


@dataclass(frozen=True)
class SegmentationPreset:
    """The evaluation settings a ``GEMSegmentationModule.preset`` stands for (each is also a setting of its own)."""

    short_side: int  # the resized image's shorter side
    window: int  # sliding-window size in px, 0: the whole image at once
    stride: int | None  # sliding-window stride in px (None with window 0)
    templates: tuple[str, ...]  # the sentences each class name is averaged over
    background: BackgroundRule
    background_threshold: float  # probability below which a pixel is background (with a background class)
    logit_scale: float  # the softmax's scale on the cosines
    background_area: float | None  # prompted rule: classes below this share of the foreground area are dropped


#: the presets; the per-dataset part of SCLIP's protocol (Cityscapes' shorter side 560, COCO-Stuff's 448, the logit
#: scale and threshold of the datasets with background) is ``grounding.protocols.segmentation.DATASETS``
PRESETS: dict[str, SegmentationPreset] = {
    "gem": SegmentationPreset(short_side=448, window=0, stride=None, templates=(GEM_TEMPLATE,), background="unprompted",
                              background_threshold=0.85, logit_scale=100.0, background_area=None),
    "sclip": SegmentationPreset(short_side=336, window=224, stride=112, templates=IMAGENET_TEMPLATES,
                                background="prompted", background_threshold=0.0, logit_scale=40.0, background_area=None),
}
PRESET_SETTINGS: tuple[str, ...] = tuple(field.name for field in fields(SegmentationPreset))


def preset_settings(preset: str, **given) -> dict:
    """The settings in effect under ``preset``: each of ``PRESET_SETTINGS`` that is ``given`` (not None) as given,
    the others the preset's. templates becomes a list; window 0 means the whole image (then stride is None)."""
    if preset not in PRESETS:
        raise ValueError(f"model.preset={preset!r} is not one of {tuple(PRESETS)}")
    unknown = sorted(set(given) - set(PRESET_SETTINGS))
    if unknown:
        raise TypeError(f"preset_settings got settings no preset sets: {unknown}")
    defaults = PRESETS[preset]
    settings = {name: getattr(defaults, name) if given.get(name) is None else given[name] for name in PRESET_SETTINGS}
    try:
        settings["templates"] = list(checked_templates(settings["templates"]))
    except ValueError as error:
        raise ValueError(f"model.{error}") from None
    if settings["window"] == 0:
        if given.get("window") == 0 and given.get("stride") is not None:
            raise ValueError(f"model.window 0 (the whole image) takes no stride; got stride {given['stride']}")
        settings["stride"] = None
    for name in ("background_threshold", "background_area"):
        if settings[name] is not None and not 0 <= settings[name] <= 1:
            raise ValueError(f"model.{name} must be in [0, 1], got {settings[name]!r}")
    if settings["background"] not in ("unprompted", "prompted"):
        raise ValueError(f"model.background={settings['background']!r} is not one of ('unprompted', 'prompted')")
    if settings["background_area"] is not None and settings["background"] != "prompted":
        raise ValueError("model.background_area applies to background 'prompted' only (SCLIP's protocol)")
    return settings


def describe_settings(preset: str, settings: dict) -> str:
    """One line: the preset and what it ran with, for the report (``short side 336, windows 224 / stride 112, ...``)."""
    window = "whole image" if not settings["window"] else f"windows {settings['window']} / stride {settings['stride']}"
    templates = settings["templates"]
    prompts = f"{len(templates)} templates" if len(templates) > 1 else repr(templates[0])
    area = "" if settings["background_area"] is None else f", area {settings['background_area']:g}"
    return (f"preset {preset}: short side {settings['short_side']}, {window}, {prompts}, background "
            f"{settings['background']} (threshold {settings['background_threshold']:g}, logit scale "
            f"{settings['logit_scale']:g}{area})")


class _GEMBase(TestTimeModule):
    """The shared part: the frozen CLIP backbone, ``DenseSimilarity`` over it, the class text embeddings."""

    def __init__(self, backbone: str, method: str, depth: int, iterations: int, temperature: float | None,
                 templates: str | Sequence[str], short_side: int, window: int | None, stride: int | None,
                 **dense_settings) -> None:
        super().__init__()
        # the backbone's own image_size only sets its preprocess(), which is not used here (DenseSimilarity resizes)
        self.backbone = build_clip(backbone, image_size=448)
        self.backbone.requires_grad_(False).eval()
        try:
            self.dense = DenseSimilarity(self.backbone, method, depth=depth, iterations=iterations,
                                         temperature=temperature, short_side=short_side, window=window or None,
                                         stride=stride, templates=templates, **dense_settings)
        except ValueError as error:
            raise ValueError(f"model.{error}") from None
        self.class_names: list[str] = []
        self._text: torch.Tensor | None = None

    def train(self, mode: bool = True):
        """Stays in eval mode: nothing here is trained."""
        return super().train(False)

    def set_text(self, names: Sequence[str | Sequence[str]]) -> None:
        """The text embeddings (S, P) of the classes' names (a class: a name or a list of its synonyms), computed
        once per dataset."""
        if not names:
            raise ValueError("GEM needs at least one class name")
        with torch.no_grad():
            self._text = self.dense.text(names).to(self.device)

    def class_maps(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(S, H, W) cosine similarities of ``text`` (S, P) at every pixel of ``image`` uint8 (3, H, W)."""
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
        method: gem | plain | maskclip | clipsurgery | sclip | clearclip | naclip (docs/gem.md).
        depth, iterations, temperature: GEM's settings (the last depth − 1 blocks; self-self iterations;
            None = the adaptive temperature).
        feature_surgery: clipsurgery only: CLIP Surgery's redundant-feature removal on the maps.
        pamr, pamr_iterations, pamr_dilations: refine each image's maps with PAMR (NACLIP's "+PAMR": 10
            iterations, dilations 8 and 16) along the image's edges, at its own size.
        preset: gem | sclip (``PRESETS``): the value of each of the settings below that is not given (None).
            An explicit setting always beats the preset, whether on the command line or in a config.
        templates: the sentence a class name is put in, or a list of them (each name's embedding is their
            normalized mean). gem: "a photo of a {}."; sclip: CLIP's 80 ImageNet templates.
        short_side: each image is resized to this shorter side. gem: 448; sclip: 336.
        window, stride: sliding-window inference over the resized image, window 0 for the whole image at once.
            gem: the whole image; sclip: 224 px windows at stride 112.
        background: on data with a background class, ``unprompted`` (gem): only the foreground classes are
            prompted and a pixel is background when its largest softmax (over the foreground classes, of
            ``logit_scale`` × cosine) is below ``background_threshold``; ``prompted`` (sclip): every class is
            prompted, background too, with its synonyms, the class probabilities are the softmax over all names
            maxed over each class's synonyms, and a pixel whose largest is below ``background_threshold``
            becomes background (``grounding.models.gem.labels_from_probabilities``).
        background_threshold: gem: 0.85; sclip: 0 (the per-dataset values: docs/gem.md).
        logit_scale: the scale of that softmax. gem: 100 (CLIP's); sclip: 40.
        background_area: ``prompted`` only: classes whose arg-max area is at most this share of the
            non-background pixels are dropped first (SCLIP's VOC21 setting 0.1); None: none dropped.
        log_images: TensorBoard panels (image | ground truth | prediction | the maps of the classes present).

    The class words come from the DataModule's ``class_synonyms`` when it has them (its ``synonyms`` setting:
    each class's map is the maximum over its synonyms'), else its ``class_names``. The settings in effect are
    what ``hparams`` and the report (``<run>/predictions/gem_<split>_iou.md``) show, with the preset's name.
    """

    def __init__(
        self,
        backbone: str = "tiny",
        method: Method = "gem",
        depth: PositiveInt = 7,
        iterations: NonNegativeInt = 1,
        temperature: PositiveFloat | None = None,
        feature_surgery: bool = False,
        pamr: bool = False,
        pamr_iterations: PositiveInt = 10,
        pamr_dilations: tuple[PositiveInt, ...] = (8, 16),
        preset: Preset = "gem",
        templates: str | list[str] | None = None,
        short_side: PositiveInt | None = None,
        window: NonNegativeInt | None = None,
        stride: PositiveInt | None = None,
        background: BackgroundRule | None = None,
        background_threshold: float | None = None,
        logit_scale: PositiveFloat | None = None,
        background_area: float | None = None,
        log_images: NonNegativeInt = 4,
    ):
        settings = preset_settings(preset, templates=templates, short_side=short_side, window=window, stride=stride,
                                   background=background, background_threshold=background_threshold,
                                   logit_scale=logit_scale, background_area=background_area)
        super().__init__(backbone, method, depth, iterations, temperature, settings["templates"],
                         settings["short_side"], settings["window"], settings["stride"], feature_surgery=feature_surgery,
                         pamr=pamr, pamr_iterations=pamr_iterations, pamr_dilations=pamr_dilations)
        self.save_hyperparameters()
        self.hparams.update(settings)  # what runs: a checkpoint reloads the same settings whatever the presets become
        self.background: int | None = None
        self.foreground: list[int] = []
        self.prompted: list[int] = []  # the classes whose words are prompted, in the order of the maps
        self.owners: list[int] = []  # for each prompted word, its position in ``prompted``
        self.metric: SegmentationMetric | None = None

    def classes_from(self, datamodule) -> None:
        self.set_classes(datamodule.class_names, datamodule.background_index, datamodule.ignore_index,
                         getattr(datamodule, "class_synonyms", None))

    def set_classes(self, class_names: list[str], background_index: int | None = None, ignore_index: int = IGNORE_INDEX,
                    synonyms: Sequence[Sequence[str]] | None = None) -> None:
        """The dataset's classes (index = label value) and, optionally, the words that prompt each (``synonyms``,
        one list per class; default: its name). The background class is prompted under ``background:
        prompted`` only."""
        if synonyms is not None and len(synonyms) != len(class_names):
            raise ValueError(f"the data's synonyms list {len(synonyms)} classes but it has {len(class_names)} "
                             f"({', '.join(class_names)}): one line per class (data.synonyms)")
        words = [[name] for name in class_names] if synonyms is None else [list(entry) for entry in synonyms]
        self.class_names = list(class_names)
        self.background = background_index
        self.foreground = [c for c in range(len(class_names)) if c != background_index]
        self.prompted = list(range(len(class_names))) if self.hparams.background == "prompted" else self.foreground
        self.owners = synonym_classes([words[c] for c in self.prompted])
        self.set_text([words[c] for c in self.prompted])
        self.metric = SegmentationMetric(len(self.class_names), ignore_index).to(self.device)

    def prompted_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """(S, H, W) cosine maps of the prompted words -> (len(prompted), H, W): each class's the maximum over its
        synonyms'."""
        return max_over_synonyms(maps, self.owners)

    def predict_labels(self, maps: torch.Tensor) -> torch.Tensor:
        """(S, H, W) cosine maps of the prompted words -> (H, W) label values of the dataset, by the ``background``
        rule (the class docstring)."""
        h = self.hparams
        if h.background == "prompted":  # every class prompted: the class index is the label value
            probabilities = class_probabilities(maps, self.owners, h.logit_scale)
            return labels_from_probabilities(probabilities, self.background, h.background_threshold, h.background_area)
        return labels_with_background(self.prompted_maps(maps), self.prompted, self.background, h.background_threshold,
                                      h.logit_scale)

    def process(self, batch: list[dict], score: bool) -> dict:
        if self._text is None:
            raise RuntimeError("GEMSegmentationModule needs the dataset's classes: run it with a SegmentationDataModule or call set_classes")
        ids, label_maps, heatmaps = [], [], []
        # images of one resized shape go through the vision tower together (a batch of equal-sized images: one pass)
        for sample, maps in zip(batch, self.dense.many([sample["image"] for sample in batch], self._text)):
            labels = self.predict_labels(maps)
            maps = self.prompted_maps(maps)
            if score:
                self.metric.update(labels, sample["labels"].to(labels.device))
            else:  # predict: each prompted class's map too (grounding-predict draws them)
                heatmaps.append({"classes": [self.class_names[c] for c in self.prompted],
                                 "indices": list(self.prompted), "maps": maps.cpu()})
            self._picture(sample, maps, labels)
            ids.append(sample["image_id"])
            label_maps.append(labels.cpu())
        if score:
            return {"image_ids": ids, "label_maps": label_maps}
        return {"image_ids": ids, "label_maps": label_maps, "heatmaps": heatmaps}

    def on_test_epoch_end(self) -> None:
        h = self.hparams
        title = f"{h.method} ({describe_settings(h.preset, {name: h[name] for name in PRESET_SETTINGS})})"
        report_segmentation(self, self.metric, self.class_names, "gem", title)

    def _picture(self, sample: dict, maps: torch.Tensor, labels: torch.Tensor) -> None:
        if self.picture_logger() is None or "labels" not in sample:  # no ground truth: a user's image
            return
        panels = segmentation_panels(sample["image"].cpu(), sample["labels"], labels)
        panels.append(labelled_overlay(sample["image"].cpu(), labels.cpu(), self.class_names))
        image, titles = panels[0], ["image", "ground truth", "prediction", "prediction over the image"]
        for c in [c for c in sample.get("present", []) if c in self.foreground][:4]:
            heat = maps[self.prompted.index(c)]
            heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-8)
            panels.append(overlay_heatmap(image, heat))
            titles.append(self.class_names[c][:30])
        self._log_panel(f"gem/{sample['image_id']}", panels, titles)


class GEMPointModule(_GEMBase):
    """Zero-shot point prediction on OpenImages V7 point labels, scored by p-mIoU (docs/gem.md, G-5).

    Args: as ``GEMSegmentationModule`` without a preset or background rule (templates: "a photo of a {}.",
    short_side: 448, window / stride: None for the whole image), plus ``threshold`` (0.5) on the min-max scaled maps.
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
        templates: str | list[str] = GEM_TEMPLATE,
        short_side: PositiveInt = 448,
        window: PositiveInt | None = None,
        stride: PositiveInt | None = None,
        threshold: float = 0.5,
        log_images: NonNegativeInt = 4,
    ):
        super().__init__(backbone, method, depth, iterations, temperature, templates, short_side, window, stride)
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

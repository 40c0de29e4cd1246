"""Region data for mask-region methods (MaskInversion): a dataset and a DataModule over the records of
``grounding.data.region_readers`` (COCO, RefCOCO, PhraseCut, label PNGs, the synthetic dataset's files).

``RegionDataset`` yields one dict per image (see its docstring); ``RegionDataModule`` builds it from
LightningCLI-friendly settings, including the embedded synthetic dataset.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch

from grounding.data import synthetic as syn
from grounding.data.evaluation import EvaluationDataModule, RecordDataset
from grounding.data.images import image_tensor, read_rgb_image
from grounding.data.region_readers import (
    RegionImageRecord,
    load_coco_regions,
    load_phrasecut_regions,
    load_refcoco_regions,
    load_semantic_regions,
)
from grounding.data.skips import SkipReport

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------- dataset
class RegionDataset(RecordDataset):
    """Images at their original size with their region masks.

    ``dataset[i]`` is ``{"image_id": str, "image": uint8 (3, H, W), "masks": bool (R, H, W),
    "region_ids": [str] * R, "class_names": [str | None] * R, "category_ids": [int | None] * R,
    "expressions": [[str, ...]] * R}``. A region whose mask decodes to nothing is dropped, counted in
    ``report`` ("empty mask") and logged.
    """

    def __init__(self, records: list[RegionImageRecord], class_names: list[str], report: SkipReport | None = None):
        super().__init__(records, class_names)
        self.report = report if report is not None else SkipReport("regions")

    @property
    def num_regions(self) -> int:
        return sum(len(r.regions) for r in self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = read_rgb_image(record.path, (record.width, record.height), record.image_id)
        image = image_tensor(image)
        cache: dict = {}
        masks, regions = [], []
        for region in record.regions:
            mask = region.mask.decode(record.height, record.width, cache)
            if not mask.any():
                self.report.add("empty mask", region.region_id)
                log.warning("%s: region %s has an empty mask after decoding; left out", self.report.source, region.region_id)
                continue
            masks.append(torch.from_numpy(mask))
            regions.append(region)
        return {
            "image_id": record.image_id,
            "image": image,
            "masks": torch.stack(masks) if masks else torch.zeros(0, record.height, record.width, dtype=torch.bool),
            "region_ids": [r.region_id for r in regions],
            "class_names": [r.class_name for r in regions],
            "category_ids": [r.category_id for r in regions],
            "expressions": [list(r.expressions) for r in regions],
        }


# ------------------------------------------------------------------------------------- DataModule
FORMATS = ("synthetic", "coco", "refcoco", "phrasecut", "semantic")
SYNTHETIC_TASKS = ("class", "referring", "semantic", "phrasecut")


class RegionDataModule(EvaluationDataModule):
    """Region batches for test-time methods: ``test_dataloader`` / ``predict_dataloader`` yield lists of
    ``RegionDataset`` samples (see there).

    Args:
        format: synthetic | coco | refcoco | phrasecut | semantic.
        split: the split to read ("val", "test", "testA", ...): selects the refs of RefCOCO, and the
            files of the synthetic dataset.
        synthetic_root: folder of the synthetic dataset (format "synthetic"); generated there if absent
            (``synthetic`` holds generator settings, as in the detection DataModule).
        task: for format "synthetic": "class" (COCO instances of the split, at ``level``), "referring"
            (its RefCOCO files, refs of the split), "semantic" (its label PNGs), "phrasecut" (its
            PhraseCut files). Settings given explicitly below take precedence over the synthetic paths.
        annotations: coco: instances file; refcoco: instances.json; phrasecut: refer_<split>.json.
        images: image folder (refcoco: the folder ``file_name`` of instances.json is relative to).
        refs: refcoco: the ``refs(<who>).p`` pickle.
        labels, classes: semantic: label PNG folder and classes.txt.
        image_list: semantic: the split's image stems (VOC's ImageSets/Segmentation/<split>.txt); without it
            every image of ``images`` and every label of ``labels`` is read.
        image_data: phrasecut: image_data_<split>.json (optional; sizes are read from the images otherwise).
        file_pattern: phrasecut: image file name pattern (default "{image_id}.jpg").
        level: coco (and synthetic "class"): "class" or "instance" regions.
        ignore_background: semantic: no region for label 0, and "background" not in ``class_names``.
        max_images: only the first N images (quick runs).
        batch_size, num_workers: loaders (batches are lists of samples).
    """

    def __init__(
        self,
        format: Literal["synthetic", "coco", "refcoco", "phrasecut", "semantic"] = "synthetic",
        split: str = "val",
        synthetic_root: str | None = "data/synthetic",
        synthetic: dict | None = None,
        task: Literal["class", "referring", "semantic", "phrasecut"] = "class",
        annotations: str | None = None,
        images: str | None = None,
        refs: str | None = None,
        labels: str | None = None,
        classes: str | None = None,
        image_list: str | None = None,
        image_data: str | None = None,
        file_pattern: str | None = None,
        level: Literal["class", "instance"] = "class",
        ignore_background: bool = True,
        max_images: int | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.check_format(format, FORMATS)
        if format == "synthetic" and task not in SYNTHETIC_TASKS:
            raise ValueError(f"task must be one of {', '.join(SYNTHETIC_TASKS)} (format 'synthetic'); got {task!r}")
        if format == "synthetic" and not synthetic_root:
            raise ValueError("format 'synthetic' needs synthetic_root")
        if level not in ("class", "instance"):
            raise ValueError(f"level must be 'class' or 'instance'; got {level!r}")
        self.check_loader_settings(split, max_images, batch_size, num_workers, limit_name="max_images")
        required = {
            "coco": ("annotations", "images"),
            "refcoco": ("refs", "annotations", "images"),
            "phrasecut": ("annotations", "images"),
            "semantic": ("images", "labels", "classes"),
        }.get(format, ())
        self.check_required(format, required, self.hparams)
        self.dataset: RegionDataset | None = None

    def _load(self) -> tuple[list[RegionImageRecord], list[str], SkipReport]:
        h = self.hparams
        fmt, paths = h.format, {k: h[k] for k in ("annotations", "images", "refs", "labels", "classes", "image_data", "file_pattern")}
        if fmt == "synthetic":
            root = Path(h.synthetic_root)
            image_format = syn.load_meta(root)["config"].get("image_format", "jpg")
            fmt, defaults = {
                "class": ("coco", {"annotations": syn.instances_path(root, h.split), "images": syn.images_dir(root, h.split)}),
                "referring": ("refcoco", {
                    "refs": syn.refcoco_dir(root) / "refs(synthetic).p",
                    "annotations": syn.refcoco_dir(root) / "instances.json",
                    "images": root / "images",
                }),
                "semantic": ("semantic", {
                    "images": syn.images_dir(root, h.split), "labels": syn.semantic_dir(root, h.split),
                    "classes": root / "semantic" / "classes.txt",
                }),
                "phrasecut": ("phrasecut", {
                    "annotations": syn.phrasecut_dir(root) / f"refer_{h.split}.json", "images": syn.images_dir(root, h.split),
                    "image_data": syn.phrasecut_dir(root) / f"image_data_{h.split}.json",
                    "file_pattern": "{image_id:06d}." + image_format,
                }),
            }[h.task]
            paths = {k: v if v is not None else defaults.get(k) for k, v in paths.items()}
            if h.task == "phrasecut" and not Path(paths["annotations"]).exists():
                raise FileNotFoundError(
                    f"PhraseCut file not found: {paths['annotations']} (the synthetic dataset at {root} predates its PhraseCut"
                    f" files: regenerate it with `python -m grounding.data.synthetic --out {root} --force`)"
                )
        if fmt == "coco":
            return load_coco_regions(paths["annotations"], paths["images"], h.level)
        if fmt == "refcoco":
            return load_refcoco_regions(paths["refs"], paths["annotations"], paths["images"], h.split)
        if fmt == "phrasecut":
            return load_phrasecut_regions(paths["annotations"], paths["images"], paths["image_data"], paths["file_pattern"] or "{image_id}.jpg")
        return load_semantic_regions(paths["images"], paths["labels"], paths["classes"], h.ignore_background, h.image_list)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        self.prepare_data()
        records, class_names, report = self._load()
        if self.hparams.max_images is not None:
            records = records[: self.hparams.max_images]
        report.log()
        self.dataset = RegionDataset(records, class_names, report)

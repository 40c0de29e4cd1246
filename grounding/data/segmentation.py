"""Semantic-segmentation data: images with label maps (one class index per pixel, 255 = ignore), the
input of open-vocabulary segmentation methods (InvSeg, GEM) scored by mIoU.

``SegmentationDataset`` reads a record of ``grounding.data.segmentation_readers`` per sample (the image and
its label map, at the image's own size); ``SegmentationDataModule`` picks the reader by ``format``:

- ``voc``: PASCAL VOC 2012 (``load_voc``), VOC21; ``voc20``: the same without background (``load_voc20``);
- ``context60`` / ``context59``: PASCAL Context as mmsegmentation converts it, with / without background
  (``load_context60``, ``load_context59``);
- ``coco_stuff``: COCO-Stuff-164k's 171 classes (``load_coco_stuff``); ``coco_object_stuff``: COCO-Object made
  from the same label maps, background + 80 things (``load_coco_object_stuff``);
- ``cityscapes``: Cityscapes' 19 train ids (``load_cityscapes``);
- ``folder``: any image folder and label-PNG folder with a classes file: ADE20K-150 and other exports
  (``load_label_folder``, ``reduce_zero_label`` for ADE20K's PNGs);
- ``coco_object``: COCO-Object, painted from a COCO instances file (``load_coco_object``);
- ``synthetic``: the project's synthetic dataset, generated on first use (``load_synthetic_segmentation``).

What each reader checks and skips is in its module; the skips are logged when the DataModule is set up.
``synonyms`` names a class-name file with synonyms (``label_maps.read_class_synonyms``): the words that
prompt each class, ``class_synonyms``.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

from grounding.constants import IGNORE_INDEX
from grounding.data.evaluation import EvaluationDataModule, LabelMapOutput, RecordDataset
from grounding.data.images import image_tensor, read_rgb_image
from grounding.data.label_maps import read_class_synonyms, synonyms_path
from grounding.data.segmentation_readers import (
    VOC_PROMPT_NAMES,
    SegmentationRecord,
    check_records,
    check_same_size,
    load_cityscapes,
    load_coco_object,
    load_coco_object_stuff,
    load_coco_stuff,
    load_context59,
    load_context60,
    load_label_folder,
    load_synthetic_segmentation,
    load_voc,
    load_voc20,
)
from grounding.data.skips import SkipReport

Format = Literal[
    "voc", "voc20", "context60", "context59", "coco_stuff", "coco_object_stuff", "cityscapes", "folder", "coco_object",
    "synthetic",
]
FORMATS = get_args(Format)

ROOT_READERS = {
    "voc20": load_voc20, "context60": load_context60, "context59": load_context59, "coco_stuff": load_coco_stuff,
    "coco_object_stuff": load_coco_object_stuff, "cityscapes": load_cityscapes,
}
"""The formats read from a dataset folder ``root`` and a split alone: format -> reader(root, split)."""


# ------------------------------------------------------------------------------------- dataset
class SegmentationDataset(RecordDataset):
    """Images at their own size with their label maps.

    ``dataset[i]`` is ``{"image": uint8 (3, H, W), "labels": int64 (H, W) (IGNORE_INDEX = ignore),
    "image_id": str, "present": sorted label values in the map other than IGNORE_INDEX (the "oracle"
    category set), "path": str}``. Grey, palette, CMYK and 16-bit images are turned into 8-bit RGB.
    """

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        if record.size is not None:  # the annotation file's size: the image must have it before masks are drawn at it
            image = read_rgb_image(record.path, record.size, record.image_id)
            labels = record.labels.read(len(self.class_names))
        else:  # the label PNG's size
            labels = record.labels.read(len(self.class_names))
            check_same_size(record.labels.path, (labels.shape[1], labels.shape[0]), record.path)
            image = read_rgb_image(record.path, (labels.shape[1], labels.shape[0]), record.image_id)
        present = np.unique(labels)
        return {
            "image": image_tensor(image),
            "labels": torch.from_numpy(labels),
            "image_id": record.image_id,
            "present": [int(v) for v in present if v != IGNORE_INDEX],
            "path": str(record.path),
        }


# ------------------------------------------------------------------------------------- DataModule
class SegmentationDataModule(LabelMapOutput, EvaluationDataModule):
    """Semantic-segmentation batches for test-time methods: ``test_dataloader`` / ``predict_dataloader``
    yield lists of ``SegmentationDataset`` samples.

    Args:
        format: voc | voc20 | context60 | context59 | coco_stuff | coco_object_stuff | cityscapes | folder |
            coco_object | synthetic (see the module docstring).
        split: the split served: voc, voc20: ``ImageSets/Segmentation/<split>.txt``; context60, context59:
            ``ImageSets/SegmentationContext/<split>.txt``; coco_stuff, coco_object_stuff: the folders
            ``images/<split>``, ``annotations/<split>`` (``val2017``); cityscapes: ``leftImg8bit/<split>``,
            ``gtFine/<split>``; synthetic: its folder.
        root: voc, voc20: the ``VOC2012`` folder; context60, context59: the ``VOC2010`` folder; coco_stuff,
            coco_object_stuff: COCO-Stuff's folder (``images/``, ``annotations/``); cityscapes: its folder.
        image_dir: folder: the images; coco_object: the folder the file's ``file_name``s are relative to.
        label_dir, image_list: folder: the label PNGs and (optional) the stems to read.
        classes_file: one class name a line, line index = label value (folder: required; voc: optional).
        reduce_zero_label: folder: 0 -> 255 and v -> v - 1 (ADE20K's PNGs).
        annotation_file: coco_object: the COCO instances file.
        class_names: names to use instead of the data's (same count), e.g. words a prompt reads better.
        prompt_names: voc, voc20 with the built-in classes: use ``VOC_PROMPT_NAMES`` ("dining table", ...).
        synonyms: a class-name file with synonyms or a built-in name (``label_maps.BUILTIN_SYNONYMS``: voc21,
            voc20, context60, ...): one line per class, its words separated by ", "; sets ``class_synonyms``.
        synthetic_root, synthetic: synthetic: the dataset's folder, generated there if absent with the
            generator settings ``synthetic`` (as in the other DataModules).
        limit: only the first N images (quick runs).
        check_images: read every image and label header before use (sizes, truncated files).
        batch_size, num_workers: loaders (batches are lists of samples).
    """

    def __init__(
        self,
        format: Format = "synthetic",
        split: str = "val",
        root: str | None = None,
        image_dir: str | None = None,
        label_dir: str | None = None,
        classes_file: str | None = None,
        image_list: str | None = None,
        reduce_zero_label: bool = False,
        annotation_file: str | None = None,
        class_names: list[str] | None = None,
        prompt_names: bool = False,
        synonyms: str | None = None,
        synthetic_root: str | None = "data/synthetic",
        synthetic: dict | None = None,
        limit: int | None = None,
        check_images: bool = True,
        batch_size: int = 1,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.check_format(format, FORMATS)
        required = {
            "folder": ("image_dir", "label_dir", "classes_file"), "coco_object": ("annotation_file", "image_dir"),
            "synthetic": ("synthetic_root",),
        }.get(format, ("root",))
        self.check_required(format, required, self.hparams)
        if reduce_zero_label and format != "folder":
            raise ValueError(f"reduce_zero_label applies to format 'folder' only; got format {format!r}")
        if prompt_names and (format not in ("voc", "voc20") or classes_file or class_names):
            raise ValueError("prompt_names applies to formats 'voc', 'voc20' with their built-in classes (no classes_file, no class_names)")
        self.check_loader_settings(split, limit, batch_size, num_workers)
        if class_names is not None and (not class_names or not all(isinstance(n, str) and n.strip() for n in class_names)):
            raise ValueError(f"class_names must be a list of non-empty names; got {class_names!r}")
        # read now: a wrong name or a broken file fails before any model is loaded
        self._synonyms = read_class_synonyms(synonyms) if synonyms is not None else None
        self.dataset: SegmentationDataset | None = None
        self.report: SkipReport | None = None
        self._background_index: int | None = None

    def _load(self) -> tuple[list[SegmentationRecord], list[str], SkipReport]:
        h = self.hparams
        if h.format == "voc":
            return load_voc(h.root, h.split, h.classes_file)
        if h.format in ROOT_READERS:
            return ROOT_READERS[h.format](h.root, h.split)
        if h.format == "folder":
            return load_label_folder(h.image_dir, h.label_dir, h.classes_file, h.image_list, h.reduce_zero_label)
        if h.format == "coco_object":
            return load_coco_object(h.annotation_file, h.image_dir)
        return load_synthetic_segmentation(h.synthetic_root, h.split)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        h = self.hparams
        self.prepare_data()
        records, names, report = self._load()
        if len(names) > IGNORE_INDEX:
            raise ValueError(f"{report.source}: {len(names)} classes, but label value {IGNORE_INDEX} means ignore (at most {IGNORE_INDEX})")
        # the first class is background when the data says so (VOC, COCO-Object, synthetic, Context-60)
        self._background_index = 0 if names[0] == "background" else None
        if self._synonyms is not None and len(self._synonyms) != len(names):
            raise ValueError(
                f"synonyms file {synonyms_path(h.synonyms)} has {len(self._synonyms)} lines but the {h.format} data has {len(names)} classes"
            )
        if h.prompt_names:
            names = list(VOC_PROMPT_NAMES) if h.format == "voc" else list(VOC_PROMPT_NAMES[1:])
        if h.class_names is not None:
            if len(h.class_names) != len(names):
                raise ValueError(
                    f"class_names lists {len(h.class_names)} names but the {h.format} data has {len(names)} classes ({', '.join(names)})"
                )
            names = [" ".join(n.split()) for n in h.class_names]
        if h.limit is not None:
            records = records[: h.limit]
        if h.check_images:
            check_records(records)
        report.log()
        self.report = report
        self.dataset = SegmentationDataset(records, names)

    @property
    def background_index(self) -> int | None:
        """0 when the data's first class is "background", else None (ADE20K, Pascal Context-59)."""
        if self.dataset is None:
            self.setup()
        return self._background_index

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_synonyms(self) -> list[list[str]]:
        """The words that prompt each class (index = label value): the lines of ``synonyms``, else each class
        name alone (``[[name] for name in class_names]``)."""
        if self.dataset is None:
            self.setup()
        if self._synonyms is None:
            return [[name] for name in self.dataset.class_names]
        return [list(words) for words in self._synonyms]

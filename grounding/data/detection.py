"""The COCO-format detection DataModule shared by the detection methods.

Point it at any COCO instances files and image folders, or at ``synthetic_root``: the synthetic dataset
(``grounding.data.synthetic``) is generated there when absent and its train/val/test splits are used
for whatever paths are not given explicitly. The files are read by ``grounding.data.coco``; LVIS v1 files
are read the same way (``grounding.data.coco_file``: an image's path from its ``coco_url``), and
``evaluator: lvis`` has them scored by LVIS Fixed AP instead of COCOeval (docs/image.md "LVIS").

A training image that turns out unreadable in the middle of an epoch (cut short, not an image, another
size than the file says) is skipped and counted, like the readers' other skips: the dataset returns an
``UnreadableImage`` (in a loader worker), ``collate_detection`` leaves it out of the batch, and the loader
counts it in the main process (``grounding.data.skips.UnreadableImages``), with a warning naming the file.
More than ``max_bad_images`` different files stop the run with an error listing them. Evaluation splits
never skip: every image they hold is scored (``check_images`` reads them up front).
"""

from __future__ import annotations

from typing import Literal
import importlib.util
import json
import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from grounding.data.coco import INVALID_BOXES, CocoDetection, collate_detection, detection_transforms
from grounding.data.coco_file import ground_truth, lvis_ground_truth, read_categories, read_coco
from grounding.data.sampling import EpochSampler, ResumableDataLoader, evaluation_sampler
from grounding.data.skips import UnreadableImages
from grounding.data.synthetic import prepare_synthetic
from grounding.metrics.lvis_eval import LVIS_MISSING
from grounding.utils import write_atomic

log = logging.getLogger(__name__)

CHECK_IMAGES = ("none", "eval", "all")
#: how the evaluation splits are scored: COCOeval box AP, or LVIS Fixed AP (an LVIS annotation file)
EVALUATORS = ("coco", "lvis")


class CocoDetectionDataModule(L.LightningDataModule):
    """Detection batches: ``pixel_values`` (B, 3, H, W), ``pixel_mask`` (B, H, W), ``targets``.

    Args:
        train_annotations / train_images (and val_, test_): a COCO instances file and its image folder.
        synthetic_root: folder of the synthetic dataset; generated there if absent (``synthetic`` holds
            generator settings, e.g. ``{"num_train": 600, "seed": 0}``; when given, an existing dataset
            generated with other settings is an error, never overwritten).
        image_size, max_size: shorter-side resize and cap of the longer side.
        train_scales: shorter sides drawn at random in training (default ``[image_size]``).
        flip_prob, crop_prob, crop_scale: training augmentation (random flip, random resized crop).
        batch_size, eval_batch_size, num_workers: loaders.
        train_fraction: keep a random fraction of the training images (low-data protocol).
        shots_per_category: k-shot training set (GLIP protocol), drawn with ``subset_seed``.
        return_masks: also return instance masks (from polygons / RLE), transformed with the image.
        split: the split that ``test`` / ``predict`` read (what ``grounding-eval`` evaluates): val or test.
        invalid_boxes: ``skip`` (count, log, and leave malformed / empty / outside boxes out of training and
            of the ground truth that COCOeval sees) or ``error`` (fail naming the file and annotation id).
        check_images: read every image header before a split is used (size against the JSON, truncated
            JPEG/PNG) in ``eval`` splits (val, test), ``all`` splits, or ``none``.
        seed: the training order and augmentation are functions of (seed, epoch, image) alone, so resumed and
            multi-process runs see exactly what an uninterrupted single-process run sees.
        max_bad_images: training images that may turn out unreadable during the run (each skipped, counted
            and logged; see the module docstring); one more stops the run with an error listing them. 0:
            the first one stops it.
        evaluator: how the val / test splits are scored. ``coco``: COCOeval box AP (AP, AP50, ..., AR100, ...).
            ``lvis``: LVIS box Fixed AP (AP, AP50, AP75, APs, APm, APl, APr, APc, APf), for LVIS v1 annotation
            files (their images' ``neg_category_ids`` and ``not_exhaustive_category_ids``, their categories'
            ``frequency``); needs the optional ``lvis`` package.
    """

    def __init__(
        self,
        train_annotations: str | None = None,
        train_images: str | None = None,
        val_annotations: str | None = None,
        val_images: str | None = None,
        test_annotations: str | None = None,
        test_images: str | None = None,
        synthetic_root: str | None = None,
        synthetic: dict | None = None,
        image_size: int = 800,
        max_size: int = 1333,
        train_scales: list[int] | None = None,
        flip_prob: float = 0.5,
        crop_prob: float = 0.5,
        crop_scale: tuple[float, float] = (0.3, 1.0),
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        train_fraction: float = 1.0,
        shots_per_category: int | None = None,
        subset_seed: int = 0,
        return_masks: bool = False,
        split: Literal["val", "test"] = "val",
        invalid_boxes: Literal["skip", "error"] = "skip",
        check_images: Literal["none", "eval", "all"] = "eval",
        seed: int = 0,
        max_bad_images: int = 10,
        evaluator: Literal["coco", "lvis"] = "coco",
    ):
        super().__init__()
        self.save_hyperparameters()
        if split not in ("val", "test"):
            raise ValueError(f"data.split must be 'val' or 'test' (the split grounding-eval evaluates), got {split!r}")
        if invalid_boxes not in INVALID_BOXES:
            raise ValueError(f"data.invalid_boxes must be one of {INVALID_BOXES}, got {invalid_boxes!r}")
        if check_images not in CHECK_IMAGES:
            raise ValueError(f"data.check_images must be one of {CHECK_IMAGES}, got {check_images!r}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("image_size", image_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
        if isinstance(max_bad_images, bool) or not isinstance(max_bad_images, int) or max_bad_images < 0:
            raise ValueError(f"data.max_bad_images must be an integer >= 0, got {max_bad_images!r}")
        if evaluator not in EVALUATORS:
            raise ValueError(
                f"data.evaluator must be 'coco' (COCOeval box AP) or 'lvis' (LVIS Fixed AP of an LVIS annotation file),"
                f" got {evaluator!r}"
            )
        if evaluator == "lvis" and importlib.util.find_spec("lvis") is None:
            raise ImportError(f"data.evaluator=lvis: {LVIS_MISSING}")
        if max_size is not None and max_size <= max([image_size] + list(train_scales or [])):
            raise ValueError(f"max_size={max_size} must be greater than image_size and every train_scale ({image_size}, {train_scales})")
        self.paths = {
            "train": (train_annotations, train_images),
            "val": (val_annotations, val_images),
            "test": (test_annotations, test_images),
        }
        if synthetic_root is not None:
            root = Path(synthetic_root)
            for split, (annotations, images) in self.paths.items():
                self.paths[split] = (
                    annotations or str(root / "annotations" / f"instances_{split}.json"),
                    images or str(root / "images" / split),
                )
        if not any(a for a, _ in self.paths.values()):
            raise ValueError("CocoDetectionDataModule needs synthetic_root or at least one *_annotations file")
        for split, (annotations, images) in self.paths.items():
            if bool(annotations) != bool(images):
                raise ValueError(f"{split}_annotations and {split}_images must be given together (got {annotations!r}, {images!r})")
        self.datasets: dict[str, CocoDetection] = {}
        self._categories: dict[int, str] | None = None
        self.unreadable: UnreadableImages | None = None

    def prepare_data(self) -> None:
        root = self.hparams.synthetic_root
        if root is not None:
            prepare_synthetic(root, self.hparams.synthetic)

    @property
    def categories(self) -> dict[int, str]:
        """Category id -> name shared by all splits (an error names the files if they disagree)."""
        if self._categories is None:
            self.prepare_data()
            found = {}
            for split, (annotations, _) in self.paths.items():
                if annotations and Path(annotations).exists():
                    found[annotations] = read_categories(annotations)
            if not found:
                raise FileNotFoundError(f"none of the annotation files exists: {[a for a, _ in self.paths.values() if a]}")
            (first, categories), *others = found.items()
            for other, other_categories in others:
                if other_categories != categories:
                    raise ValueError(f"categories differ between {first} and {other}: a model's prompt must be the same for both")
            self._categories = categories
        return self._categories

    def _dataset(self, split: str) -> CocoDetection:
        if split not in self.datasets:
            annotations, images = self.paths[split]
            if not annotations:
                raise ValueError(f"no {split} data: set {split}_annotations and {split}_images")
            train = split == "train"
            h = self.hparams
            self.datasets[split] = CocoDetection(
                annotations,
                images,
                detection_transforms(train, h.image_size, h.max_size, h.train_scales, h.flip_prob, h.crop_prob, h.crop_scale),
                train=train,
                return_masks=h.return_masks,
                train_fraction=h.train_fraction if train else 1.0,
                shots_per_category=h.shots_per_category if train else None,
                subset_seed=h.subset_seed,
                invalid_boxes=h.invalid_boxes,
                check_images=h.check_images == "all" or (h.check_images == "eval" and not train),
                seed=h.seed,
                skip_unreadable=train,
            )
        return self.datasets[split]

    def ground_truth(self, split: str):
        """pycocotools ``COCO`` of the images and annotations the loader kept in ``split`` (None if no file)."""
        if not self.paths[split][0] or not Path(self.paths[split][0]).exists():
            return None
        dataset = self._dataset(split)
        coco_file = read_coco(dataset.annotation_file)
        if coco_file.lvis and split != "train":  # COCOeval would count every unannotated category of an image as absent from it
            log.warning("%s is an LVIS file scored by COCOeval; --data.evaluator lvis scores it by LVIS's rules (Fixed AP)",
                        dataset.annotation_file)
        return ground_truth(coco_file, dataset.annotation_ids, dataset.image_ids)

    def lvis_ground_truth(self, split: str) -> dict | None:
        """LVIS-format ground truth (a dict, ``grounding.data.coco_file.lvis_ground_truth``) of the images and
        annotations the loader kept in ``split`` (None if no file); an error names what an LVIS file lacks."""
        if not self.paths[split][0] or not Path(self.paths[split][0]).exists():
            return None
        dataset = self._dataset(split)
        return lvis_ground_truth(read_coco(dataset.annotation_file), dataset.annotation_ids, dataset.image_ids)

    @property
    def evaluator(self) -> str:
        """``coco`` or ``lvis``: the metric of the val / test splits (``ImageGroundingModule`` builds it)."""
        return self.hparams.evaluator

    @property
    def smallest_side(self) -> int:
        """The smallest shorter side an image is resized to (evaluation or any training scale)."""
        return min([self.hparams.image_size] + list(self.hparams.train_scales or []))

    @property
    def evaluation_split(self) -> str:
        """The split ``test_dataloader`` / ``predict_dataloader`` read."""
        return self.hparams.split

    def setup(self, stage: str | None = None) -> None:
        _ = self.categories  # validate early, before any model work
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": [self.hparams.split], "predict": [self.hparams.split]}
        for split in wanted.get(stage, ["train", "val", "test"]):
            if self.paths[split][0]:
                self._dataset(split)
        h = self.hparams
        trainer = getattr(self, "trainer", None)
        if stage == "fit" and trainer is not None and (h.shots_per_category or h.train_fraction < 1):
            log_dir = trainer.log_dir  # a collective call under DDP: every rank makes it
            if trainer.is_global_zero and log_dir:
                self.write_train_subset(Path(log_dir) / "train_subset.json")

    def write_train_subset(self, path: str | Path) -> Path:
        """Write the sampled training set (k-shot or fraction) as a COCO instances file, atomically: given as
        ``--data.train_annotations`` (without the sampling settings) it trains on exactly these images and boxes."""
        coco = self.ground_truth("train")
        path = Path(path)
        write_atomic(path, lambda temporary: Path(temporary).write_text(json.dumps(coco.dataset), encoding="utf-8"))
        log.info("training subset (%d images, %d boxes) written to %s", len(coco.dataset["images"]),
                 len(coco.dataset["annotations"]), path)
        return path

    def _loader(self, split: str) -> DataLoader:
        h = self.hparams
        dataset = self._dataset(split)
        return DataLoader(
            dataset,
            batch_size=h.eval_batch_size or h.batch_size,
            shuffle=False,
            sampler=evaluation_sampler(dataset),  # each image on one process: every image counts once
            num_workers=h.num_workers,
            collate_fn=collate_detection,
            persistent_workers=h.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        dataset = self._dataset("train")
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (None, None)
        sampler = EpochSampler(dataset, shuffle=True, seed=h.seed, num_replicas=world, rank=rank)
        if self.unreadable is None:  # one count for the whole run, whichever loader gives the batches out
            self.unreadable = UnreadableImages(h.max_bad_images, dataset.skipped, sampler.num_replicas)
        return ResumableDataLoader(
            dataset,
            sampler,
            batch_size=h.batch_size,
            on_batch=self.unreadable.screen,
            num_workers=h.num_workers,
            collate_fn=collate_detection,
            persistent_workers=h.num_workers > 0,
            # the loader's own generator: creating its iterator must not move the global random state
            generator=torch.Generator().manual_seed(h.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.split)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.split)

"""The base of the DataModules of test-time methods (MaskInversion's regions, segmentation, OpenImages points,
MIMIC's concepts): one split, read in order, served alike by ``test_dataloader`` and ``predict_dataloader`` as
lists of samples.

What they share lives here: the checks of their common settings (``format``, the settings a format needs,
split / limit / batch size / workers), generating the synthetic dataset when they read it, and the loader.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from grounding.constants import IGNORE_INDEX
from grounding.data.label_maps import voc_palette

from grounding.data.sampling import evaluation_sampler
from grounding.data.synthetic import prepare_synthetic


def collate_samples(batch: list[dict]) -> list[dict]:
    """The samples unchanged: every image keeps its own size; the method resizes."""
    return batch


class RecordDataset(Dataset):
    """A list of records (one per image) with the dataset's class names; subclasses read a record in
    ``__getitem__``."""

    def __init__(self, records: Sequence, class_names: Sequence[str]):
        self.records = list(records)
        self.class_names = list(class_names)

    def __len__(self) -> int:
        return len(self.records)


class EvaluationDataModule(L.LightningDataModule):
    """Subclasses build ``self.dataset`` in ``setup`` and have ``split``, ``batch_size`` and ``num_workers``
    among their hyperparameters; under DDP each process reads its share of the split, each sample on exactly one
    process (``grounding.data.sampling.evaluation_sampler``).

    A subclass reading the synthetic dataset has ``synthetic_root`` and ``synthetic`` (generator settings)
    among its hyperparameters and says when it reads it in ``uses_synthetic`` (default: ``format`` is
    ``"synthetic"``); ``prepare_data`` then generates it when absent.
    """

    dataset: Dataset | None = None
    collate: Callable[[list[dict]], object] = staticmethod(collate_samples)

    @staticmethod
    def check_format(format: object, formats: Sequence[str]) -> None:
        """ValueError unless ``format`` is one of ``formats``."""
        if format not in formats:
            raise ValueError(f"format must be one of {', '.join(formats)}; got {format!r}")

    @staticmethod
    def check_required(format: str, required: Sequence[str], given: Mapping[str, object]) -> None:
        """ValueError naming the settings of ``required`` that ``given`` (name -> value) leaves empty."""
        absent = [name for name in required if not given[name]]
        if absent:
            raise ValueError(f"format {format!r} needs {', '.join(absent)} (set: {', '.join(required)})")

    @staticmethod
    def check_loader_settings(split: object, limit: object, batch_size: object, num_workers: object,
                              limit_name: str = "limit") -> None:
        """The settings every evaluation DataModule shares, each with an error naming it (``limit_name``: the
        subclass's name of the setting keeping the first N samples)."""
        if not isinstance(split, str) or not split:
            raise ValueError(f"split must be a non-empty string; got {split!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"{limit_name} must be a positive integer or None; got {limit!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0; got {num_workers!r}")

    @property
    def uses_synthetic(self) -> bool:
        """Whether the data is the synthetic dataset at ``synthetic_root``."""
        return self.hparams.get("format") == "synthetic"

    def prepare_data(self) -> None:
        if self.uses_synthetic:
            prepare_synthetic(self.hparams.synthetic_root, self.hparams.synthetic)

    @property
    def evaluation_split(self) -> str:
        """The split ``test_dataloader`` / ``predict_dataloader`` read."""
        return self.hparams.split

    @property
    def class_names(self) -> list[str]:
        """The dataset's class names (index = class index, or label value for label maps)."""
        if self.dataset is None:
            self.setup()
        return list(self.dataset.class_names)

    def sampler(self) -> Sampler | None:
        """The order and share of the samples this process reads: ``evaluation_sampler`` (each sample on one
        process, none repeated; all of them in order with one process)."""
        return evaluation_sampler(self.dataset)

    def _loader(self) -> DataLoader:
        if self.dataset is None:
            self.setup()
        h = self.hparams
        return DataLoader(
            self.dataset, batch_size=h.batch_size, shuffle=False, sampler=self.sampler(), num_workers=h.num_workers,
            collate_fn=self.collate, persistent_workers=h.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


class LabelMapOutput:
    """For a DataModule whose methods predict label maps: the ignore label and the palette the label PNGs are
    written in (read by ``LabelMapWriter`` and the segmentation modules)."""

    @property
    def ignore_index(self) -> int:
        return IGNORE_INDEX

    @property
    def palette(self) -> torch.Tensor:
        """(256, 3) uint8 PASCAL VOC palette for label PNGs (entry 255, ignore, is VOC's border colour)."""
        return torch.from_numpy(voc_palette(256))

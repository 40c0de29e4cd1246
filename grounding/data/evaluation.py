"""The base of the DataModules of test-time methods (MaskInversion's regions, segmentation): one split, read
in order, served alike by ``test_dataloader`` and ``predict_dataloader`` as lists of samples."""

from __future__ import annotations

from typing import Callable, Sequence

import lightning as L
from torch.utils.data import DataLoader, Dataset


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
    among their hyperparameters; under DDP Lightning gives each process its share of the split."""

    dataset: Dataset | None = None
    collate: Callable[[list[dict]], object] = staticmethod(collate_samples)

    @staticmethod
    def check_loader_settings(split: object, limit: object, batch_size: object, num_workers: object) -> None:
        """The settings every evaluation DataModule shares, each with an error naming it."""
        if not isinstance(split, str) or not split:
            raise ValueError(f"split must be a non-empty string; got {split!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive integer or None; got {limit!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0; got {num_workers!r}")

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

    def _loader(self) -> DataLoader:
        if self.dataset is None:
            self.setup()
        h = self.hparams
        return DataLoader(
            self.dataset, batch_size=h.batch_size, shuffle=False, num_workers=h.num_workers,
            collate_fn=self.collate, persistent_workers=h.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
